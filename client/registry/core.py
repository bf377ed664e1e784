"""The registry core: every rule about entities, collections, versions, aliases, tags, runs
and lineage, in one place, over SQLAlchemy Core.

Both stores use it: the embedded store (``client/store/local.py``) calls it in-process on a
SQLite file; the server (``server/``) is an HTTP shell over the very same class on SQLite or
PostgreSQL.  Nothing about the rules lives anywhere else.

Concurrency: a commit is one transaction that locks the collection row, takes
``next_index``, bumps it and inserts the version, so versions are gapless and atomic under any
number of writers, on any number of machines sharing the database.  SQLite gets
``BEGIN IMMEDIATE`` for writes (one writer at a time, readers unblocked thanks to WAL).
"""

from __future__ import annotations

import codecs
import datetime as dt
import logging
import secrets
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Mapping, Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from .. import names
from ..names import TtlSentinel
from ..errors import (ArtifactFSError, ConflictError, InvalidNameError, LatestMovedError, ManifestError, MissingBlobError,
                      NotFoundError)
from ..hashing import b64_to_hex, is_md5_hex
from ..blockmap import BlockMap
from ..manifest import ByteLines, compute_digest, iter_entries
from ..store.base import CollectionRecord, CommitRequest, RunFileRecord, RunRecord, VersionRecord
from . import schema as t
from .blobs import BlobBackend
from .migrate import prepare as prepare_schema

log = logging.getLogger(__name__)


def _expired(rec: VersionRecord, now: dt.datetime) -> bool:
    """Whether a version's TTL has run out; a TTL beyond the calendar (stored before TTLs were
    checked) never runs out, rather than failing the sweep."""
    if rec.ttl_seconds is None:
        return False
    try:
        return rec.created_at + dt.timedelta(seconds=rec.ttl_seconds) <= now
    except (OverflowError, ValueError, TypeError):
        return False


_BLOB_BATCH = 500


def _collection_missing(entity: str, project: str, collection: str) -> NotFoundError:
    return NotFoundError(f"artifact collection {entity}/{project}/{collection} not found")


def _run_missing(run_id: str) -> NotFoundError:
    return NotFoundError(f"run {run_id!r} not found")


class _NotUtf8(ManifestError):
    """A manifest blob is not valid UTF-8."""


class _Utf8Checked:
    """A manifest blob's stream that checks its bytes are UTF-8 as they are read (raising
    _NotUtf8), so one read of the blob serves both the parse and the check."""

    def __init__(self, raw: BinaryIO, manifest_md5: str) -> None:
        self._raw = raw
        self._md5 = manifest_md5
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")

    def _checked(self, data: bytes, at_end: bool) -> bytes:
        try:
            self._decoder.decode(data, final=at_end)
        except UnicodeDecodeError as exc:
            raise _NotUtf8(f"manifest {self._md5} is not valid UTF-8 (byte {exc.start} of a chunk)") from None
        return data

    def read(self, size: int = -1, /) -> bytes:
        data = self._raw.read(size)
        return self._checked(data, at_end=size < 0 or (size > 0 and not data))

    def readline(self, size: int = -1, /) -> bytes:
        line = self._raw.readline(size)
        return self._checked(line, at_end=size != 0 and not line)

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line

    def drain(self) -> None:
        """Read (and check) what is left."""
        while self.read(1 << 20):
            pass


def _parse_manifest(f: ByteLines, manifest_md5: str) -> tuple[list[tuple[str, str]], int, dict[str, tuple[int, str]], bytes]:
    """(path, digest) pairs, total size, {content md5: (size, path)} and the first bytes after
    the closing brace of a manifest stream; ManifestError or MissingBlobError if it is refused."""
    pairs: list[tuple[str, str]] = []
    size = 0
    content: dict[str, tuple[int, str]] = {}
    try:
        for e in iter_entries(f):
            if len(pairs) >= names.MAX_ENTRIES:
                raise ManifestError(f"manifest has more than {names.MAX_ENTRIES} entries")
            esize = e.size or 0
            if isinstance(esize, bool) or not isinstance(esize, int) or not 0 <= esize <= names.MAX_ENTRY_SIZE:
                raise ManifestError(f"entry {e.path!r} has size {e.size!r}; sizes are 0 to 2^63-1 bytes")
            pairs.append((e.path, e.digest))
            size += esize
            if e.ref is None:
                try:
                    content[b64_to_hex(e.digest)] = (esize, e.path)
                except ValueError:
                    raise MissingBlobError(f"entry {e.path!r} has digest {e.digest!r}, not a base64 md5") from None
        trailing = f.read(4096)
    except RecursionError:
        raise ManifestError(f"manifest {manifest_md5} is nested too deeply") from None
    except (UnicodeDecodeError, OverflowError, TypeError) as exc:
        raise ManifestError(f"manifest {manifest_md5} is not readable: {exc}") from None
    return pairs, size, content, trailing


# kinds of the rows of RegistryCore._collection_names
_ALIAS, _TAG, _COUNT, _VERSION_TAG = range(4)


@dataclass
class _CollectionNames:
    """What collection records need besides their rows, gathered by ``_collection_names``."""

    aliases: dict[int, dict[str, int]] = field(default_factory=dict)  #: collection -> alias -> index
    tags: dict[int, list[str]] = field(default_factory=dict)  #: collection -> tags
    counts: dict[int, int] = field(default_factory=dict)  #: collection -> committed versions
    version_aliases: dict[str, list[str]] = field(default_factory=dict)  #: version -> aliases
    version_tags: dict[str, list[str]] = field(default_factory=dict)  #: version -> tags

    def add(self, row: Sequence[Any]) -> None:
        """One row (kind, collection id, version id, name, number) of ``_collection_names``."""
        kind, cid, vid, name, n = row
        if kind == _ALIAS:
            self.aliases.setdefault(cid, {})[name] = n
            self.version_aliases.setdefault(vid, []).append(name)
        elif kind == _TAG:
            self.tags.setdefault(cid, []).append(name)
        elif kind == _COUNT:
            self.counts[cid] = n
        else:
            self.version_tags.setdefault(vid, []).append(name)

    def record(self, row: sa.Row[Any], entity: str, project: str) -> CollectionRecord:
        return CollectionRecord(
            entity=entity, project=project, name=row.name, type=row.type, description=row.description,
            created_at=_aware(row.created_at), tags=tuple(self.tags.get(row.id, ())),
            version_count=self.counts.get(row.id, 0), aliases=self.aliases.get(row.id, {}))


def _version_record(r: sa.Row[Any], aliases: Iterable[str], tags: Iterable[str]) -> VersionRecord:
    """The record of a row of ``RegistryCore._version_query`` with the version's alias and tag names."""
    linked = r.s_e is not None  # a version linked into a portfolio, its source found
    return VersionRecord(
        id=r.id, entity=r.e_name, project=r.p_name, collection=r.c_name, index=r.idx,
        type=r.s_type if linked else r.c_type, digest=r.digest, manifest_md5=r.manifest_md5,
        size=r.size, file_count=r.file_count, description=r.description, metadata=dict(r.meta or {}),
        aliases=_alias_order(aliases), tags=tuple(sorted(tags)), created_at=_aware(r.created_at),
        updated_at=_aware(r.updated_at), ttl_seconds=r.ttl_seconds, state=r.state,
        logged_by_run=f"{r.r_e}/{r.r_p}/{r.r_id}" if r.r_id is not None else None,
        source_entity=r.s_e if linked else None,
        source_project=r.s_p if linked else None,
        source_collection=r.s_c if linked else None,
        source_index=r.s_idx if linked else None,
    )


@dataclass(frozen=True)
class CollectionListing:
    """One collection's part of a project listing: its record and its committed versions (by
    index), as they were at ``stamp`` (the collection's ``stamp`` column)."""

    stamp: int
    collection: CollectionRecord
    versions: list[VersionRecord]


@dataclass(frozen=True)
class ListingPart:
    """A collection of a project listing (in listing order): its id, its stamp now, and its
    part of the listing, None when the caller already holds the part of that stamp."""

    id: int
    stamp: int
    part: CollectionListing | None


def _new_stamp() -> int:
    """A collection's listing stamp after a change.  Random rather than a counter: SQLite may
    give a new collection the id of a deleted one, and a counter would repeat its stamps."""
    return secrets.randbits(62)


def _alias_order(aliases: Iterable[str]) -> tuple[str, ...]:
    """A version's aliases as records list them: ``latest`` first, then by name."""
    return tuple(sorted(aliases, key=lambda a: (a != "latest", a)))


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _aware(value: dt.datetime) -> dt.datetime:
    """A stored time in UTC (SQLite gives it naive; PostgreSQL in the session's time zone)."""
    return value.astimezone(dt.timezone.utc) if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def normalise_db_url(url: str) -> str:
    """``postgresql://`` (or ``postgres://``) -> ``postgresql+psycopg://``: psycopg 3 is the driver we ship."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(db_url: str) -> Engine:
    """An engine with the per-dialect settings the rules rely on."""
    db_url = normalise_db_url(db_url)
    if db_url.startswith("sqlite"):
        engine = sa.create_engine(db_url, connect_args={"timeout": 60, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _rec: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            immediate = conn.get_execution_options().get("immediate", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine
    # LIFO: the connections a busy server keeps using stay warm, the others go idle (and get pinged)
    engine = sa.create_engine(db_url, pool_size=10, max_overflow=20, pool_use_lifo=True)
    _ping_idle_connections(engine, IDLE_PING_SECONDS)
    return engine


#: A pooled PostgreSQL connection that sat idle longer than this is pinged before it is used,
#: so one broken while idle (a restarted database) is replaced before a request meets it.
#: Connections in steady use are not pinged: a ping is a round trip, and the calls a fleet of
#: mounts makes most (resolve, list versions) are one or two (what pool_pre_ping would double).
IDLE_PING_SECONDS = 10.0


def _ping_idle_connections(engine: Engine, idle: float) -> None:
    @sa.event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        if record is not None:
            record.info["afs_idle_since"] = time.monotonic()

    @sa.event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("afs_idle_since")
        if since is None or time.monotonic() - since < idle:
            return  # new, or in use a moment ago
        try:
            ok = engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:  # noqa: BLE001 - any failure: let the pool connect afresh
            raise sa.exc.DisconnectionError(f"idle connection lost: {exc}") from exc
        if ok is False:
            raise sa.exc.DisconnectionError("idle connection lost")


class RegistryCore:
    """All registry rules.  ``blobs`` is where manifest bytes are read from at commit time."""

    def __init__(self, db_url: str, blobs: BlobBackend, *, migrate: bool = True) -> None:
        """``migrate``: upgrade an older database to this code's schema (client/registry/migrate.py);
        without it an older database raises SchemaVersionError (an empty one is always created)."""
        self.db_url = db_url
        self.engine = make_engine(db_url)
        self.blobs = blobs
        self._pg = self.engine.dialect.name == "postgresql"
        try:
            prepare_schema(self.engine, upgrade=migrate)
        except BaseException:
            self.engine.dispose()
            raise

    def close(self) -> None:
        self.engine.dispose()

    # -- transactions ---------------------------------------------------------------------
    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            conn = conn.execution_options(immediate=True)
            with conn.begin():
                yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """A connection for reads.  On PostgreSQL without a transaction: at READ COMMITTED every
        statement takes its own snapshot anyway, so BEGIN and COMMIT would only add two round
        trips to each call.  SQLite reads keep one transaction (one snapshot, no round trips)."""
        with self.engine.connect() as conn:
            if self._pg:
                yield conn.execution_options(isolation_level="AUTOCOMMIT")
                return
            with conn.begin():
                yield conn

    def _insert_ignore(self, conn: Connection, table: sa.Table, **values: Any) -> None:
        self._insert_ignore_many(conn, table, [values])

    def _insert_ignore_many(self, conn: Connection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
        """INSERT … ON CONFLICT DO NOTHING in the dialect of the engine, 500 rows a statement."""
        dialect = postgresql if self._pg else sqlite
        for i in range(0, len(rows), _BLOB_BATCH):
            conn.execute(dialect.insert(table).values(rows[i:i + _BLOB_BATCH]).on_conflict_do_nothing())

    # -- id lookups ---------------------------------------------------------------------------
    def _entity_id(self, conn: Connection, entity: str, create: bool = False) -> int:
        if create:
            names.validate_entity(entity)
            self._insert_ignore(conn, t.entities, name=entity, created_at=utcnow())
        row = conn.execute(sa.select(t.entities.c.id).where(t.entities.c.name == entity)).first()
        if row is None:
            raise NotFoundError(f"entity {entity!r} not found")
        return row[0]

    def _project_id(self, conn: Connection, entity: str, project: str, create: bool = False) -> int:
        if not create:  # one joined query; the slow path below only to say what is missing
            row = conn.execute(sa.select(t.projects.c.id)
                               .join(t.entities, t.projects.c.entity_id == t.entities.c.id)
                               .where(t.entities.c.name == entity, t.projects.c.name == project)).first()
            if row is not None:
                return row[0]
        eid = self._entity_id(conn, entity, create)
        if create:
            names.validate_project(project)
            self._insert_ignore(conn, t.projects, entity_id=eid, name=project, created_at=utcnow())
        row = conn.execute(sa.select(t.projects.c.id).where(
            t.projects.c.entity_id == eid, t.projects.c.name == project)).first()
        if row is None:
            raise NotFoundError(f"project {entity}/{project} not found")
        return row[0]

    @staticmethod
    def _collection_query(entity: str, project: str, collection: str) -> sa.Select:
        """A collection's row found by its path, in one joined query."""
        return (sa.select(t.collections)
                .join(t.projects, t.collections.c.project_id == t.projects.c.id)
                .join(t.entities, t.projects.c.entity_id == t.entities.c.id)
                .where(t.entities.c.name == entity, t.projects.c.name == project, t.collections.c.name == collection))

    def _find_collection(self, conn: Connection, entity: str, project: str, collection: str,
                         lock: bool = False) -> sa.Row | None:
        q = self._collection_query(entity, project, collection)
        if lock and self._pg:
            q = q.with_for_update(of=t.collections)
        return conn.execute(q).first()

    def _collection_row(self, conn: Connection, entity: str, project: str, collection: str,
                        lock: bool = False) -> sa.Row:
        """The collection's row in one joined query (the calls a fleet makes most go through
        here); only when it is missing do more queries find out which name was wrong."""
        row = self._find_collection(conn, entity, project, collection, lock)
        if row is None:
            self._project_id(conn, entity, project)  # NotFoundError naming the entity or project
            raise _collection_missing(entity, project, collection)
        return row

    @staticmethod
    def _changed(c: Connection, which: sa.ColumnElement[bool]) -> None:
        """Give the collections ``which`` selects a new listing stamp: every write that changes
        what a listing shows of a collection calls this (or sets ``stamp`` in its own UPDATE) in
        its transaction, before its other changes, so the collection is locked first."""
        c.execute(t.collections.update().where(which).values(stamp=_new_stamp()))

    @staticmethod
    def _holding_links_to(versions: sa.Select | list[str]) -> sa.ColumnElement[bool]:
        """The portfolios holding links to these versions (a link shows its source's path and type)."""
        return t.collections.c.id.in_(sa.select(t.versions.c.collection_id).where(t.versions.c.source_id.in_(versions)))

    # -- records ------------------------------------------------------------------------------
    # A version's row comes with its collection's path, the path of the run that logged it and,
    # for a linked version, its source's path and type: outer joins, so one query in all cases.
    _RUN, _RUN_P, _RUN_E = t.runs.alias("run"), t.projects.alias("run_p"), t.entities.alias("run_e")
    _SRC, _SRC_C = t.versions.alias("src"), t.collections.alias("src_c")
    _SRC_P, _SRC_E = t.projects.alias("src_p"), t.entities.alias("src_e")
    _VERSION_COLS = (
        t.versions, t.collections.c.name.label("c_name"), t.collections.c.type.label("c_type"),
        t.projects.c.name.label("p_name"), t.entities.c.name.label("e_name"),
        _RUN.c.run_id.label("r_id"), _RUN_P.c.name.label("r_p"), _RUN_E.c.name.label("r_e"),
        _SRC.c.idx.label("s_idx"), _SRC_C.c.name.label("s_c"), _SRC_C.c.type.label("s_type"),
        _SRC_P.c.name.label("s_p"), _SRC_E.c.name.label("s_e"),
    )

    def _version_query(self) -> sa.Select:
        run, run_p, run_e = self._RUN, self._RUN_P, self._RUN_E
        src, src_c, src_p, src_e = self._SRC, self._SRC_C, self._SRC_P, self._SRC_E
        return (sa.select(*self._VERSION_COLS)
                .join(t.collections, t.versions.c.collection_id == t.collections.c.id)
                .join(t.projects, t.collections.c.project_id == t.projects.c.id)
                .join(t.entities, t.projects.c.entity_id == t.entities.c.id)
                .outerjoin(run, t.versions.c.run_pk == run.c.pk)
                .outerjoin(run_p, run.c.project_id == run_p.c.id)
                .outerjoin(run_e, run_p.c.entity_id == run_e.c.id)
                .outerjoin(src, t.versions.c.source_id == src.c.id)
                .outerjoin(src_c, src.c.collection_id == src_c.c.id)
                .outerjoin(src_p, src_c.c.project_id == src_p.c.id)
                .outerjoin(src_e, src_p.c.entity_id == src_e.c.id))

    def _records(self, conn: Connection, rows: Sequence[sa.Row[Any]]) -> list[VersionRecord]:
        """Records for rows of ``_version_query``: their aliases and tags in one query per 500."""
        aliases: dict[str, list[str]] = {}
        tags: dict[str, list[str]] = {}
        ids = [r.id for r in rows]
        for i in range(0, len(ids), _BLOB_BATCH):
            chunk = ids[i:i + _BLOB_BATCH]
            # aliases and tags in one round trip (kind 0: alias, 1: tag)
            names_q = sa.union_all(
                sa.select(t.aliases.c.version_id, sa.literal(0).label("kind"), t.aliases.c.alias.label("name"))
                .where(t.aliases.c.version_id.in_(chunk)),
                sa.select(t.version_tags.c.version_id, sa.literal(1), t.version_tags.c.tag)
                .where(t.version_tags.c.version_id.in_(chunk)))
            for vid, kind, name in conn.execute(names_q):
                (tags if kind else aliases).setdefault(vid, []).append(name)
        return [_version_record(r, aliases.get(r.id, ()), tags.get(r.id, ())) for r in rows]

    def _record(self, conn: Connection, version_id: str) -> VersionRecord:
        rows = conn.execute(self._version_query().where(t.versions.c.id == version_id)).all()
        if not rows:
            raise NotFoundError(f"artifact version {version_id!r} not found")
        return self._records(conn, rows)[0]

    # -- namespace ------------------------------------------------------------------------------
    def list_entities(self) -> list[str]:
        with self._read() as c:
            return [r[0] for r in c.execute(sa.select(t.entities.c.name).order_by(t.entities.c.name))]

    def list_projects(self, entity: str) -> list[str]:
        with self._read() as c:
            eid = self._entity_id(c, entity)
            q = sa.select(t.projects.c.name).where(t.projects.c.entity_id == eid).order_by(t.projects.c.name)
            return [r[0] for r in c.execute(q)]

    def _collection_names(self, c: Connection, names: _CollectionNames,
                          in_scope: Callable[[sa.ColumnElement[Any]], sa.ColumnElement[bool]], *,
                          counts: bool = False, version_tags: bool = False) -> None:
        """Add to ``names`` the aliases and tags of the collections ``in_scope`` (a filter on a
        collection id column) and, if asked, their committed-version counts and the tags of their
        committed versions: one UNION ALL, ordered by name as the tags always were."""
        no_text, no_int = sa.cast(sa.null(), sa.String), sa.cast(sa.null(), sa.Integer)
        committed = t.versions.c.state == "COMMITTED"
        parts: list[sa.Select] = [
            sa.select(sa.literal(_ALIAS).label("kind"), t.aliases.c.collection_id.label("cid"),
                      t.aliases.c.version_id.label("vid"), t.aliases.c.alias.label("name"), t.versions.c.idx.label("n"))
            .join(t.versions, t.aliases.c.version_id == t.versions.c.id).where(in_scope(t.aliases.c.collection_id)),
            sa.select(sa.literal(_TAG), t.collection_tags.c.collection_id, no_text, t.collection_tags.c.tag, no_int)
            .where(in_scope(t.collection_tags.c.collection_id)),
        ]
        if counts:
            parts.append(sa.select(sa.literal(_COUNT), t.versions.c.collection_id, no_text, no_text, sa.func.count())
                         .where(in_scope(t.versions.c.collection_id), committed).group_by(t.versions.c.collection_id))
        if version_tags:
            parts.append(sa.select(sa.literal(_VERSION_TAG), t.versions.c.collection_id, t.version_tags.c.version_id,
                                   t.version_tags.c.tag, no_int)
                         .join(t.versions, t.version_tags.c.version_id == t.versions.c.id)
                         .where(in_scope(t.versions.c.collection_id), committed))
        union = sa.union_all(*parts)
        for row in c.execute(union.order_by(union.selected_columns.name)):
            names.add(row)

    def _collection_records(self, c: Connection, rows: Iterable[sa.Row], entity: str, project: str) -> list[CollectionRecord]:
        """Records for collection rows in one query per 500 collections (aliases, version
        counts, tags), not three per collection."""
        rows = list(rows)
        names = _CollectionNames()
        ids = [r.id for r in rows]
        for i in range(0, len(ids), _BLOB_BATCH):
            chunk = ids[i:i + _BLOB_BATCH]
            self._collection_names(c, names, lambda col: col.in_(chunk), counts=True)
        return [names.record(row, entity, project) for row in rows]

    def list_collections(self, entity: str, project: str, type: str | None = None) -> list[CollectionRecord]:
        with self._read() as c:
            pid = self._project_id(c, entity, project)
            q = sa.select(t.collections).where(t.collections.c.project_id == pid)
            if type is not None:
                q = q.where(t.collections.c.type == type)
            return self._collection_records(c, c.execute(q.order_by(t.collections.c.name)).all(), entity, project)

    def get_collection(self, entity: str, project: str, collection: str) -> CollectionRecord:
        with self._read() as c:
            row = self._collection_row(c, entity, project, collection)
            return self._collection_records(c, [row], entity, project)[0]

    def list_project(self, entity: str, project: str) -> tuple[list[CollectionRecord], list[VersionRecord]]:
        """A project's collections and all their committed versions (what a mount lists as
        ``name:vN`` and ``name:alias``) in three queries however many there are."""
        parts = [p.part for p in self.list_project_parts(entity, project) if p.part is not None]
        return [p.collection for p in parts], [v for p in parts for v in p.versions]

    def list_project_parts(self, entity: str, project: str, known: Mapping[int, int] | None = None) -> list[ListingPart]:
        """The project listing collection by collection (by name), each part built only when
        ``known`` (collection id -> stamp of the part the caller holds) does not hold its stamp.

        Three queries however many there are: the collections (with their stamps); the versions
        of those to build, with their run and source paths; the aliases and tags of both.  When
        every part is known, only the first.  A part is never older than its stamp (the stamp is
        read first), so a part held for the stamp read now is up to date."""
        known = known or {}
        with self._read() as c:
            rows = c.execute(sa.select(t.collections)
                             .join(t.projects, t.collections.c.project_id == t.projects.c.id)
                             .join(t.entities, t.projects.c.entity_id == t.entities.c.id)
                             .where(t.entities.c.name == entity, t.projects.c.name == project)
                             .order_by(t.collections.c.name)).all()
            if not rows:
                self._project_id(c, entity, project)  # NotFoundError unless it exists (and is empty)
                return []
            todo = [r for r in rows if known.get(r.id) != r.stamp]
            built = self._collection_listings(c, todo, entity, project) if todo else {}
            return [ListingPart(r.id, r.stamp, built.get(r.id)) for r in rows]

    def _collection_listings(self, c: Connection, rows: list[sa.Row], entity: str, project: str) -> dict[int, CollectionListing]:
        """The listing parts of these collection rows (all of one project), in two queries."""
        ids = {r.id for r in rows}
        # past a batch of ids, the whole project (what is not asked for is left out below)
        chosen: sa.Select | list[int] = (
            sa.select(t.collections.c.id).where(t.collections.c.project_id == rows[0].project_id)
            if len(ids) > _BLOB_BATCH else sorted(ids))

        def scope(col: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
            return col.in_(chosen)

        q = self._version_query().where(scope(t.versions.c.collection_id), t.versions.c.state == "COMMITTED")
        version_rows = [r for r in c.execute(q.order_by(t.versions.c.collection_id, t.versions.c.idx))
                        if r.collection_id in ids]
        names = _CollectionNames()
        self._collection_names(c, names, scope, version_tags=True)
        # the committed versions are all here: their count needs no query
        names.counts.update(Counter(r.collection_id for r in version_rows))
        versions: dict[int, list[VersionRecord]] = {i: [] for i in ids}
        for r in version_rows:
            versions[r.collection_id].append(
                _version_record(r, names.version_aliases.get(r.id, ()), names.version_tags.get(r.id, ())))
        return {r.id: CollectionListing(r.stamp, names.record(r, entity, project), versions[r.id]) for r in rows}

    def list_types(self, entity: str, project: str) -> list[str]:
        with self._read() as c:
            pid = self._project_id(c, entity, project)
            q = sa.select(t.collections.c.type).where(t.collections.c.project_id == pid).distinct()
            return sorted(r[0] for r in c.execute(q))

    def update_collection(self, entity: str, project: str, collection: str, *, name: str | None = None,
                          description: str | None = None, tags: Iterable[str] | None = None,
                          type: str | None = None) -> CollectionRecord:
        """``ArtifactCollection.save()``: rename, describe ("" clears), replace the tags, or
        change the type (a sequence only, as in W&B: a portfolio's type is its versions')."""
        new_name = None if name is None else names.validate_collection(name)
        description = names.validate_description(description)
        new_tags = None if tags is None else [names.validate_tag(x) for x in tags]
        new_type = None if type is None else names.validate_type(type)
        with self._write() as c:
            row = self._collection_row(c, entity, project, collection, lock=True)
            values: dict[str, Any] = {}
            if new_type is not None and new_type != row.type:
                if row.kind != "sequence":
                    raise ConflictError(f"{entity}/{project}/{collection} is a portfolio (linked versions): "
                                        f"only a sequence's type can be changed")
                values["type"] = new_type
            if new_name is not None and new_name != row.name:
                taken = c.execute(sa.select(t.collections.c.id).where(
                    t.collections.c.project_id == row.project_id, t.collections.c.name == new_name)).first()
                if taken is not None:
                    raise ConflictError(f"{entity}/{project}/{new_name} already exists; choose another name")
                values["name"] = new_name
            if description is not None:
                values["description"] = description or None
            if values or new_tags is not None:
                c.execute(t.collections.update().where(t.collections.c.id == row.id)
                          .values(**values, stamp=_new_stamp()))
            if "name" in values or "type" in values:  # what the links to its versions show
                self._changed(c, self._holding_links_to(
                    sa.select(t.versions.c.id).where(t.versions.c.collection_id == row.id)))
            if new_tags is not None:
                c.execute(t.collection_tags.delete().where(t.collection_tags.c.collection_id == row.id))
                self._insert_ignore_many(c, t.collection_tags,
                                         [{"collection_id": row.id, "tag": x} for x in dict.fromkeys(new_tags)])
            row = c.execute(sa.select(t.collections).where(t.collections.c.id == row.id)).one()
            return self._collection_records(c, [row], entity, project)[0]

    def delete_collection(self, entity: str, project: str, collection: str) -> None:
        """Delete a collection, its versions and aliases, and the links into portfolios of its
        versions (a portfolio that loses its ``latest`` gets its newest remaining link)."""
        with self._write() as c:
            row = self._collection_row(c, entity, project, collection, lock=True)
            mine = sa.select(t.versions.c.id).where(t.versions.c.collection_id == row.id).scalar_subquery()
            links = t.versions.c.source_id.in_(mine)
            portfolios = {cid for (cid,) in c.execute(sa.select(t.versions.c.collection_id).where(links).distinct())}
            if portfolios - {row.id}:
                self._changed(c, t.collections.c.id.in_(sorted(portfolios - {row.id})))
            c.execute(t.versions.delete().where(links))
            c.execute(t.collections.delete().where(t.collections.c.id == row.id))  # cascades to versions, aliases
            for cid in portfolios - {row.id}:
                held = c.execute(sa.select(t.aliases.c.version_id).where(
                    t.aliases.c.collection_id == cid, t.aliases.c.alias == "latest")).first()
                newest = c.execute(sa.select(t.versions.c.id).where(
                    t.versions.c.collection_id == cid, t.versions.c.state == "COMMITTED")
                    .order_by(t.versions.c.idx.desc()).limit(1)).first()
                if held is None and newest is not None:
                    self._add_aliases(c, cid, newest.id, ["latest"])

    def _versions_of(self, entity: str, project: str, collection: str) -> sa.Select:
        """Committed versions of a collection named by its path, in one joined query."""
        return self._version_query().where(t.entities.c.name == entity, t.projects.c.name == project,
                                           t.collections.c.name == collection, t.versions.c.state == "COMMITTED")

    def list_versions(self, entity: str, project: str, collection: str) -> list[VersionRecord]:
        """Two queries (the versions, their aliases and tags); a third only when there are none,
        to tell an empty collection from a missing one."""
        with self._read() as c:
            rows = c.execute(self._versions_of(entity, project, collection).order_by(t.versions.c.idx)).all()
            if not rows:
                self._collection_row(c, entity, project, collection)  # NotFoundError naming what is missing
            return self._records(c, rows)

    # -- versions -------------------------------------------------------------------------------
    def resolve(self, entity: str, project: str, collection: str, selector: str) -> VersionRecord:
        """Two queries (the version found by its path and selector, its aliases and tags): the
        call a fleet of mounts makes most."""
        with self._read() as c:
            q = self._versions_of(entity, project, collection)
            if names.is_version_selector(selector):
                q = q.where(t.versions.c.idx == int(selector[1:]))
            elif is_md5_hex(selector):
                q = q.where(t.versions.c.digest == selector).order_by(t.versions.c.idx.desc()).limit(1)
            else:
                q = q.join(t.aliases, (t.aliases.c.version_id == t.versions.c.id)).where(
                    t.aliases.c.collection_id == t.versions.c.collection_id, t.aliases.c.alias == selector)
            rows = c.execute(q).all()
            if not rows:
                self._collection_row(c, entity, project, collection)  # NotFoundError naming what is missing
                raise NotFoundError(f"artifact {entity}/{project}/{collection}:{selector} not found")
            return self._records(c, rows)[0]

    def get_version(self, version_id: str) -> VersionRecord:
        with self._read() as c:
            return self._record(c, version_id)

    def _manifest_summary(self, entity: str, manifest_md5: str) -> tuple[str, int, int, dict[str, tuple[int, str]]]:
        """Validate a manifest blob; return (digest, size, file_count, {content md5: (size, path)}).

        Refused (ManifestError): invalid UTF-8, bytes after the closing brace, nesting too deep,
        sizes outside [0, 2^63), more than MAX_ENTRIES entries, a path listed twice, a path that
        is both a file and a directory (``a`` and ``a/b``).  The blob is read once (one GET from
        S3): its UTF-8 is checked as it is parsed, and invalid UTF-8 anywhere in it is the error
        reported, whatever else is wrong before it.
        """
        with self.blobs.open(entity, manifest_md5) as raw:
            f = _Utf8Checked(raw, manifest_md5)
            refused: ArtifactFSError | None = None
            try:
                pairs, size, content, trailing = _parse_manifest(f, manifest_md5)
            except _NotUtf8:
                raise
            except ArtifactFSError as exc:
                refused = exc
            f.drain()  # the rest is UTF-8 too, else that is the error (as when it was checked first)
        if refused is not None:
            raise refused
        if trailing.strip():
            raise ManifestError(f"manifest {manifest_md5} has bytes after its closing brace: {trailing[:40]!r}")
        if size > names.MAX_ENTRY_SIZE:
            raise ManifestError(f"manifest sizes add up to {size} bytes; a version holds at most 2^63-1")
        paths = {p for p, _ in pairs}
        if len(paths) != len(pairs):
            raise InvalidNameError("manifest lists a path more than once")
        for p in paths:
            parts = p.split("/")
            for k in range(1, len(parts)):
                if "/".join(parts[:k]) in paths:
                    raise ManifestError(f"manifest lists {'/'.join(parts[:k])!r} as a file and as a directory "
                                        f"(of {p!r})")
        return compute_digest(pairs), size, len(pairs), content

    def commit(self, req: CommitRequest) -> tuple[VersionRecord, bool]:
        names.validate_entity(req.entity)
        names.validate_project(req.project)
        names.validate_collection(req.collection)
        names.validate_type(req.type)
        user_aliases = [names.validate_alias(a) for a in req.aliases if a != "latest"]
        tags = [names.validate_tag(x) for x in req.tags]
        meta = names.validate_metadata(req.metadata)
        description = names.validate_description(req.description)
        req_ttl = names.validate_ttl(req.ttl_seconds, sentinels=(TtlSentinel.INHERIT,))
        if not is_md5_hex(req.manifest_md5):
            raise InvalidNameError("manifest_md5 must be an md5 hex digest")
        digest, size, file_count, content = self._manifest_summary(req.entity, req.manifest_md5)
        # Outside the write transaction (SQLite's single writer is not held for the batches):
        # blob registrations are never removed, so what is present now is present at commit.
        with self._read() as c:
            have = self._blob_sizes(c, req.entity, [*content, req.manifest_md5])
        missing = set(content) - set(have) | ({req.manifest_md5} - set(have))
        if missing:
            raise MissingBlobError(
                f"{len(missing)} blob(s) referenced by the manifest were never uploaded "
                f"(e.g. {sorted(missing)[0]}); upload them before committing")
        for md5, (esize, path) in content.items():
            if have[md5] != esize:
                raise ManifestError(f"entry {path!r} claims {esize} bytes but its blob {md5} holds {have[md5]}")
        now = utcnow()
        with self._write() as c:
            # An existing collection (the usual commit) is found and locked in one query, with
            # what the commit needs to know; the entity, project and collection are created only
            # when it is not there.
            col = self._commit_target(c, req)
            if col is None:
                pid = self._project_id(c, req.entity, req.project, create=True)
                self._insert_ignore(c, t.collections, project_id=pid, name=req.collection, type=req.type,
                                    description=None, created_at=now, next_index=0, kind="sequence",
                                    stamp=_new_stamp())
                col = self._commit_target(c, req)
                if col is None:
                    raise _collection_missing(req.entity, req.project, req.collection)
            if col.type != req.type:
                raise ConflictError(
                    f"artifact {req.collection!r} already exists with type {col.type!r}; "
                    f"log it as type {col.type!r} or choose another name")
            if req.run_id and col.run_pk is None:
                raise _run_missing(req.run_id)
            if req.expect_latest is not None and (col.latest_id or "") != req.expect_latest:
                raise LatestMovedError(f"{req.entity}/{req.project}/{req.collection}: latest moved since this commit "
                                       "was prepared; re-read it and commit again")
            if col.latest_id is not None and col.latest_digest == digest:
                if user_aliases or tags:
                    self._changed(c, t.collections.c.id == col.id)
                self._add_aliases(c, col.id, col.latest_id, user_aliases)
                self._add_tags(c, col.latest_id, tags)
                if col.run_pk is not None:
                    self._insert_ignore(c, t.usages, run_pk=col.run_pk, version_id=col.latest_id, use_as=None)
                return self._record(c, col.latest_id), False
            idx = col.next_index
            c.execute(t.collections.update().where(t.collections.c.id == col.id)
                      .values(next_index=idx + 1, stamp=_new_stamp()))
            ttl: float | None = col.default_ttl if isinstance(req_ttl, TtlSentinel) else req_ttl  # INHERIT
            new = VersionRecord(
                id=uuid.uuid4().hex, entity=col.e_name, project=col.p_name, collection=col.name, index=idx,
                type=col.type, digest=digest, manifest_md5=req.manifest_md5, size=size, file_count=file_count,
                description=description, metadata=meta, aliases=_alias_order(dict.fromkeys(["latest", *user_aliases])),
                tags=tuple(sorted(set(tags))), created_at=now, updated_at=now, ttl_seconds=ttl, state="COMMITTED",
                logged_by_run=f"{col.e_name}/{col.p_name}/{req.run_id}" if col.run_pk is not None else None)
            c.execute(t.versions.insert().values(
                id=new.id, collection_id=col.id, idx=idx, digest=digest, manifest_md5=req.manifest_md5,
                size=size, file_count=file_count, description=description, meta=meta,
                created_at=now, updated_at=now, ttl_seconds=ttl, state="COMMITTED", run_pk=col.run_pk,
                source_id=None))
            self._add_aliases(c, col.id, new.id, new.aliases)
            self._add_tags(c, new.id, tags)
            return new, True  # what _record would read back, without reading it (the tests compare them)

    # the aliased tables of _commit_target, made once (making them is most of its CPU)
    _LATEST_ALIAS, _LATEST, _SEEN = t.aliases.alias("latest_alias"), t.versions.alias("latest"), t.collections.alias("seen")

    def _commit_target(self, c: Connection, req: CommitRequest) -> sa.Row | None:
        """The collection a commit goes into, locked, and in the same query what the commit
        needs: its entity and project names, the entity's default TTL, the collection's latest
        version (id, digest) and the key of the run that logs it.

        A PostgreSQL query that waited for the lock sees the locked row as it is now but the
        other rows as they were when it started; when the holder moved ``latest`` meanwhile
        (a commit or a link: ``next_index`` moved since then) the query is asked again, the lock
        now held, so a commit never decides on a latest that is gone."""
        latest_alias, latest, seen = self._LATEST_ALIAS, self._LATEST, self._SEEN
        run_pk: sa.ColumnElement[Any] = sa.null()
        if req.run_id:
            run_pk = sa.select(t.runs.c.pk).where(t.runs.c.project_id == t.collections.c.project_id,
                                                  t.runs.c.run_id == req.run_id).scalar_subquery()
        q = (self._collection_query(req.entity, req.project, req.collection)
             .add_columns(t.entities.c.name.label("e_name"), t.projects.c.name.label("p_name"),
                          t.entities.c.default_ttl_seconds.label("default_ttl"), latest.c.id.label("latest_id"),
                          latest.c.digest.label("latest_digest"), run_pk.label("run_pk"),
                          sa.select(seen.c.next_index).where(seen.c.id == t.collections.c.id)
                          .scalar_subquery().label("seen_next_index"))
             .outerjoin(latest_alias, (latest_alias.c.collection_id == t.collections.c.id)
                        & (latest_alias.c.alias == "latest"))
             .outerjoin(latest, latest.c.id == latest_alias.c.version_id))
        if self._pg:
            q = q.with_for_update(of=t.collections)
        row = c.execute(q).first()
        if row is not None and row.next_index != row.seen_next_index:
            row = c.execute(q).first()
        return row

    def _add_aliases(self, c: Connection, collection_id: int, version_id: str, alias_list: Iterable[str]) -> None:
        """Point each alias at the version, taking it from whichever version held it: one upsert
        (the alias is the key with the collection) per 500 aliases."""
        rows = [{"collection_id": collection_id, "alias": a, "version_id": version_id} for a in dict.fromkeys(alias_list)]
        for i in range(0, len(rows), _BLOB_BATCH):
            insert = (postgresql if self._pg else sqlite).insert(t.aliases).values(rows[i:i + _BLOB_BATCH])
            c.execute(insert.on_conflict_do_update(index_elements=[t.aliases.c.collection_id, t.aliases.c.alias],
                                                   set_={"version_id": version_id}))

    def _add_tags(self, c: Connection, version_id: str, tags: Iterable[str]) -> None:
        """Tag the version (tags it has already stay): one statement per 500 tags."""
        self._insert_ignore_many(c, t.version_tags, [{"version_id": version_id, "tag": x} for x in dict.fromkeys(tags)])

    def update_version(self, version_id: str, *, aliases: Iterable[str] | None = None,
                       tags: Iterable[str] | None = None, metadata: dict[str, Any] | None = None,
                       description: str | None = None, ttl_seconds: float | None | str = TtlSentinel.KEEP) -> VersionRecord:
        """Replace aliases/tags/metadata/description/ttl of a version (None: unchanged).

        ``latest`` is managed by the registry: it cannot be added or removed by hand.
        """
        new_aliases = None if aliases is None else [names.validate_alias(a) for a in aliases if a != "latest"]
        new_tags = None if tags is None else [names.validate_tag(x) for x in tags]
        meta = None if metadata is None else names.validate_metadata(metadata)
        description = names.validate_description(description)
        ttl_seconds = names.validate_ttl(ttl_seconds, sentinels=(TtlSentinel.INHERIT, TtlSentinel.KEEP))
        with self._write() as c:
            row = c.execute(sa.select(t.versions).where(t.versions.c.id == version_id)).first()
            if row is None or row.state != "COMMITTED":
                raise NotFoundError(f"artifact version {version_id!r} not found")
            self._changed(c, t.collections.c.id == row.collection_id)
            values: dict[str, Any] = {"updated_at": utcnow()}
            if meta is not None:
                values["meta"] = meta
            if description is not None:
                values["description"] = description
            if ttl_seconds is TtlSentinel.INHERIT:  # back to the entity's default, as a new version would get
                values["ttl_seconds"] = self._default_ttl_of_collection(c, row.collection_id)
            elif ttl_seconds is not TtlSentinel.KEEP:
                values["ttl_seconds"] = ttl_seconds
            c.execute(t.versions.update().where(t.versions.c.id == version_id).values(**values))
            if new_aliases is not None:
                c.execute(t.aliases.delete().where(t.aliases.c.version_id == version_id,
                                                   t.aliases.c.alias != "latest"))
                self._add_aliases(c, row.collection_id, version_id, new_aliases)
            if new_tags is not None:
                c.execute(t.version_tags.delete().where(t.version_tags.c.version_id == version_id))
                self._add_tags(c, version_id, new_tags)
            return self._record(c, version_id)

    def delete_version(self, version_id: str, delete_aliases: bool = False) -> None:
        """Mark a version DELETED.  Refused while it has user aliases unless delete_aliases."""
        with self._write() as c:
            row = c.execute(sa.select(t.versions).where(t.versions.c.id == version_id)).first()
            if row is None or row.state != "COMMITTED":
                raise NotFoundError(f"artifact version {version_id!r} not found")
            held = [a for (a,) in c.execute(sa.select(t.aliases.c.alias).where(t.aliases.c.version_id == version_id))]
            if [a for a in held if a != "latest"] and not delete_aliases and row.source_id is None:
                raise ConflictError(
                    f"version has aliases {sorted(held)}; remove them first or pass delete_aliases=True")
            # its collection first, as every write locks it first; then the portfolios of its links
            self._changed(c, t.collections.c.id == row.collection_id)
            self._changed(c, self._holding_links_to([version_id]))
            c.execute(t.aliases.delete().where(t.aliases.c.version_id == version_id))
            c.execute(t.versions.update().where(t.versions.c.id == version_id)
                      .values(state="DELETED", updated_at=utcnow()))
            # links into portfolios die with their source
            c.execute(t.versions.update().where(t.versions.c.source_id == version_id).values(state="DELETED"))
            c.execute(t.aliases.delete().where(t.aliases.c.version_id.in_(
                sa.select(t.versions.c.id).where(t.versions.c.source_id == version_id))))
            if "latest" in held:
                newest = c.execute(sa.select(t.versions.c.id).where(
                    t.versions.c.collection_id == row.collection_id, t.versions.c.state == "COMMITTED")
                    .order_by(t.versions.c.idx.desc()).limit(1)).first()
                if newest is not None:
                    self._add_aliases(c, row.collection_id, newest.id, ["latest"])

    # -- runs and lineage -----------------------------------------------------------------------
    def _run_pk(self, c: Connection, project_id: int, run_id: str) -> int:
        row = c.execute(sa.select(t.runs.c.pk).where(t.runs.c.project_id == project_id,
                                                     t.runs.c.run_id == run_id)).first()
        if row is None:
            raise _run_missing(run_id)
        return row[0]

    def _run_record(self, row: sa.Row, entity: str, project: str) -> RunRecord:
        return RunRecord(entity=entity, project=project, id=row.run_id, name=row.name, job_type=row.job_type,
                         config=dict(row.config or {}), state=row.state, created_at=_aware(row.created_at),
                         summary=dict(row.summary or {}), tags=tuple(row.tags or ()))

    def update_run(self, entity: str, project: str, run_id: str, *, summary: dict[str, Any] | None = None,
                   tags: Iterable[str] | None = None, config: dict[str, Any] | None = None,
                   name: str | None = None) -> RunRecord:
        """Replace a run's summary, tags, config or display name (None: unchanged)."""
        values: dict[str, Any] = {}
        if summary is not None:
            values["summary"] = names.validate_run_dict("summary", summary)
        if config is not None:
            values["config"] = names.validate_run_dict("config", config)
        if tags is not None:
            values["tags"] = names.validate_run_tags(tags)
        if name is not None:
            if not isinstance(name, str) or not 0 < len(name) <= 256:
                raise InvalidNameError(f"a run name is 1 to 256 characters, got {str(name)[:40]!r}")
            values["name"] = name
        with self._write() as c:
            pk = self._run_pk(c, self._project_id(c, entity, project), run_id)
            if values:
                c.execute(t.runs.update().where(t.runs.c.pk == pk).values(**values))
            return self._run_record(c.execute(sa.select(t.runs).where(t.runs.c.pk == pk)).one(), entity, project)

    def put_run_file(self, entity: str, project: str, run_id: str, name: str, md5_hex: str, size: int) -> RunFileRecord:
        """Save (or replace) file ``name`` of a run: the entity's blob ``md5_hex`` of ``size`` bytes."""
        names.validate_entry_path(name)
        if len(name.encode("utf-8", "surrogateescape")) > 1024:
            raise InvalidNameError(f"run file name {name[:40]!r}… is over 1024 bytes")
        if not is_md5_hex(md5_hex):
            raise InvalidNameError(f"{md5_hex!r} is not an md5 hex digest")
        now = utcnow()
        with self._write() as c:
            pk = self._run_pk(c, self._project_id(c, entity, project), run_id)
            if self._blob_sizes(c, entity, [md5_hex]).get(md5_hex) != size:
                raise MissingBlobError(f"no blob {md5_hex} of {size} bytes in {entity}; upload it first")
            c.execute(t.run_files.delete().where(t.run_files.c.run_pk == pk, t.run_files.c.name == name))
            c.execute(t.run_files.insert().values(run_pk=pk, name=name, md5=md5_hex, size=size, updated_at=now))
        return RunFileRecord(name=name, md5=md5_hex, size=size, updated_at=now)

    def list_run_files(self, entity: str, project: str, run_id: str) -> list[RunFileRecord]:
        with self._read() as c:
            pk = self._run_pk(c, self._project_id(c, entity, project), run_id)
            rows = c.execute(sa.select(t.run_files).where(t.run_files.c.run_pk == pk).order_by(t.run_files.c.name))
            return [RunFileRecord(name=r.name, md5=r.md5, size=r.size, updated_at=_aware(r.updated_at)) for r in rows]

    def create_run(self, entity: str, project: str, run_id: str | None = None, *, name: str | None = None,
                   job_type: str | None = None, config: dict[str, Any] | None = None) -> RunRecord:
        run_id = run_id or uuid.uuid4().hex[:8]
        names._check_simple("run id", run_id)
        with self._write() as c:
            pid = self._project_id(c, entity, project, create=True)
            self._insert_ignore(c, t.runs, project_id=pid, run_id=run_id, name=name or run_id, job_type=job_type,
                                config=config or {}, state="running", created_at=utcnow())
            row = c.execute(sa.select(t.runs).where(t.runs.c.project_id == pid, t.runs.c.run_id == run_id)).one()
            return self._run_record(row, entity, project)

    def get_run(self, entity: str, project: str, run_id: str) -> RunRecord:
        with self._read() as c:
            pid = self._project_id(c, entity, project)
            row = c.execute(sa.select(t.runs).where(t.runs.c.project_id == pid, t.runs.c.run_id == run_id)).first()
            if row is None:
                raise NotFoundError(f"run {entity}/{project}/{run_id} not found")
            return self._run_record(row, entity, project)

    def list_runs(self, entity: str, project: str) -> list[RunRecord]:
        with self._read() as c:
            pid = self._project_id(c, entity, project)
            rows = c.execute(sa.select(t.runs).where(t.runs.c.project_id == pid).order_by(t.runs.c.created_at))
            return [self._run_record(r, entity, project) for r in rows]

    def finish_run(self, entity: str, project: str, run_id: str, state: str = "finished") -> None:
        with self._write() as c:
            pk = self._run_pk(c, self._project_id(c, entity, project), run_id)
            c.execute(t.runs.update().where(t.runs.c.pk == pk).values(state=state))

    def create_project(self, entity: str, project: str) -> None:
        """Create ``entity/project`` (and the entity) if missing; idempotent."""
        with self._write() as c:
            self._project_id(c, entity, project, create=True)

    def delete_run(self, entity: str, project: str, run_id: str, delete_artifacts: bool = False) -> list[VersionRecord]:
        """Delete a run and its usage records; returns the versions deleted with it.

        Without ``delete_artifacts`` the versions it logged stay (their ``logged_by`` becomes
        None).  With it, every version the run logged is deleted first, aliases included, links
        into portfolios too (the W&B rule for ``Run.delete(delete_artifacts=True)``); a crash
        in between leaves the run in place, so calling again finishes the job.
        """
        doomed: list[VersionRecord] = []
        if delete_artifacts:
            doomed = [v for v in self.versions_logged_by(entity, project, run_id)
                      if v.state == "COMMITTED" and v.source_entity is None]
            for v in doomed:
                try:
                    self.delete_version(v.id, delete_aliases=True)
                except NotFoundError:
                    pass  # deleted concurrently
        with self._write() as c:
            pk = self._run_pk(c, self._project_id(c, entity, project), run_id)
            # the versions it logged, and the links to them, are listed without their run from now
            # on (their collections locked before anything else, as every write does)
            self._changed(c, t.collections.c.id.in_(sa.select(t.versions.c.collection_id).where(t.versions.c.run_pk == pk)))
            c.execute(t.usages.delete().where(t.usages.c.run_pk == pk))
            c.execute(t.versions.update().where(t.versions.c.run_pk == pk).values(run_pk=None))
            c.execute(t.runs.delete().where(t.runs.c.pk == pk))
        return doomed

    def record_use(self, entity: str, project: str, run_id: str, version_id: str, use_as: str | None = None) -> None:
        with self._write() as c:
            pk = self._run_pk(c, self._project_id(c, entity, project), run_id)
            self._record(c, version_id)
            self._insert_ignore(c, t.usages, run_pk=pk, version_id=version_id, use_as=use_as)

    def versions_logged_by(self, entity: str, project: str, run_id: str) -> list[VersionRecord]:
        with self._read() as c:
            pk = self._run_pk(c, self._project_id(c, entity, project), run_id)
            q = self._version_query().where(t.versions.c.run_pk == pk).order_by(t.versions.c.created_at)
            return self._records(c, c.execute(q).all())

    def versions_used_by(self, entity: str, project: str, run_id: str) -> list[VersionRecord]:
        with self._read() as c:
            pk = self._run_pk(c, self._project_id(c, entity, project), run_id)
            q = (self._version_query().join(t.usages, t.usages.c.version_id == t.versions.c.id)
                 .where(t.usages.c.run_pk == pk).order_by(t.versions.c.created_at))
            return self._records(c, c.execute(q).all())

    def runs_using(self, version_id: str) -> list[RunRecord]:
        with self._read() as c:
            q = (sa.select(t.runs, t.projects.c.name.label("p_name"), t.entities.c.name.label("e_name"))
                 .join(t.usages, t.usages.c.run_pk == t.runs.c.pk)
                 .join(t.projects, t.runs.c.project_id == t.projects.c.id)
                 .join(t.entities, t.projects.c.entity_id == t.entities.c.id)
                 .where(t.usages.c.version_id == version_id).order_by(t.runs.c.created_at))
            return [self._run_record(r, r.e_name, r.p_name) for r in c.execute(q)]

    # -- blobs ------------------------------------------------------------------------------------
    def _blob_sizes(self, c: Connection, entity: str, md5s: Iterable[str]) -> dict[str, int]:
        """Recorded sizes of those of ``md5s`` the entity holds (none if there is no such entity),
        one query per 500 blobs."""
        ordered = sorted(set(md5s))
        have: dict[str, int] = {}
        for i in range(0, len(ordered), _BLOB_BATCH):
            chunk = ordered[i:i + _BLOB_BATCH]
            have.update((r[0], int(r[1])) for r in c.execute(
                sa.select(t.blobs.c.md5, t.blobs.c.size).join(t.entities, t.blobs.c.entity_id == t.entities.c.id)
                .where(t.entities.c.name == entity, t.blobs.c.md5.in_(chunk))))
        return have

    def missing_blobs(self, entity: str, md5_hexes: Iterable[str], check_files: bool = False) -> set[str]:
        """Which of these blobs the entity does not hold (never looks at other entities).

        ``check_files`` (the upload shortcut): with a local blob directory, a blob whose file is
        damaged counts as missing, so the next upload of the right bytes repairs it.
        """
        md5s = list(md5_hexes)
        for m in md5s:
            if not is_md5_hex(m):
                raise InvalidNameError(f"{m!r} is not an md5 hex digest")
        with self._read() as c:
            missing = set(md5s) - set(self._blob_sizes(c, entity, md5s))
        intact = getattr(self.blobs, "intact", None) if check_files else None
        if intact is not None:
            missing |= {m for m in md5s if m not in missing and not intact(entity, m)}
        return missing

    def register_blockmap(self, entity: str, md5_hex: str, bm: BlockMap) -> None:
        """Record the block map of a registered blob (made by whoever hashed its bytes)."""
        with self._write() as c:
            eid = self._entity_id(c, entity, create=True)
            size = c.execute(sa.select(t.blobs.c.size).where(
                t.blobs.c.entity_id == eid, t.blobs.c.md5 == md5_hex)).scalar()
            if size is None or size != bm.size:
                raise MissingBlobError(f"no blob {md5_hex} of {bm.size} bytes in {entity} for a block map")
            self._insert_ignore(c, t.blob_blockmaps, entity_id=eid, md5=md5_hex, size=bm.size,
                                block_size=bm.block_size, hashes=bm.hashes)

    def blockmaps(self, entity: str, md5_hexes: Iterable[str]) -> dict[str, BlockMap]:
        """The block maps the entity holds for these blobs (absent ones are left out)."""
        wanted = sorted({m for m in md5_hexes if is_md5_hex(m)})
        out: dict[str, BlockMap] = {}
        with self._read() as c:
            try:
                eid = self._entity_id(c, entity)
            except NotFoundError:
                return out
            for i in range(0, len(wanted), _BLOB_BATCH):
                q = sa.select(t.blob_blockmaps).where(t.blob_blockmaps.c.entity_id == eid,
                                                      t.blob_blockmaps.c.md5.in_(wanted[i:i + _BLOB_BATCH]))
                for r in c.execute(q):
                    out[r.md5] = BlockMap(r.size, r.block_size, bytes(r.hashes))
        return out

    def register_blob(self, entity: str, md5_hex: str, size: int) -> None:
        """Record a blob whose bytes the backend has verified against ``md5_hex``."""
        self.register_blobs([(entity, md5_hex, size)])

    def register_blobs(self, blobs: Iterable[tuple[str, str, int]]) -> None:
        """Record many verified blobs ``(entity, md5, size)`` in one write transaction."""
        items = list(blobs)
        for _, md5_hex, _ in items:
            if not is_md5_hex(md5_hex):
                raise InvalidNameError(f"{md5_hex!r} is not an md5 hex digest")
        if not items:
            return
        now = utcnow()
        with self._write() as c:
            ids = {e: self._entity_id(c, e, create=True) for e in dict.fromkeys(e for e, _, _ in items)}
            self._insert_ignore_many(c, t.blobs, [{"entity_id": ids[e], "md5": m, "size": n, "created_at": now}
                                                  for e, m, n in items])

    # -- links (portfolios / registries), TTL ---------------------------------------------------
    def link_version(self, version_id: str, entity: str, project: str, collection: str,
                     aliases: Iterable[str] = ()) -> VersionRecord:
        """Link a version into a portfolio collection (e.g. ``wandb-registry-model/<name>``).

        The link is a version of the portfolio with its own index and aliases that shares the
        source's manifest.  Linking the same source again only adds aliases.
        """
        names.validate_collection(collection)
        user_aliases = [names.validate_alias(a) for a in aliases if a != "latest"]
        now = utcnow()
        with self._write() as c:
            src = c.execute(sa.select(t.versions).where(t.versions.c.id == version_id)).first()
            if src is None or src.state != "COMMITTED":
                raise NotFoundError(f"artifact version {version_id!r} not found")
            if src.source_id is not None:  # link the original, not a link of it
                src = c.execute(sa.select(t.versions).where(t.versions.c.id == src.source_id)).one()
            src_type = c.execute(sa.select(t.collections.c.type).where(t.collections.c.id == src.collection_id)).scalar_one()
            pid = self._project_id(c, entity, project, create=True)
            self._insert_ignore(c, t.collections, project_id=pid, name=collection, type=src_type,
                                description=None, created_at=now, next_index=0, kind="portfolio",
                                stamp=_new_stamp())
            col = self._collection_row(c, entity, project, collection, lock=True)
            if col.kind != "portfolio":
                raise ConflictError(f"{entity}/{project}/{collection} holds logged versions; link into a portfolio")
            existing = c.execute(sa.select(t.versions.c.id).where(
                t.versions.c.collection_id == col.id, t.versions.c.source_id == src.id,
                t.versions.c.state == "COMMITTED")).first()
            if existing is not None:
                if user_aliases:
                    self._changed(c, t.collections.c.id == col.id)
                self._add_aliases(c, col.id, existing.id, user_aliases)
                return self._record(c, existing.id)
            idx = col.next_index
            c.execute(t.collections.update().where(t.collections.c.id == col.id)
                      .values(next_index=idx + 1, stamp=_new_stamp()))
            vid = uuid.uuid4().hex
            c.execute(t.versions.insert().values(
                id=vid, collection_id=col.id, idx=idx, digest=src.digest, manifest_md5=src.manifest_md5,
                size=src.size, file_count=src.file_count, description=src.description, meta=src.meta,
                created_at=now, updated_at=now, ttl_seconds=None, state="COMMITTED", run_pk=src.run_pk,
                source_id=src.id))
            self._add_aliases(c, col.id, vid, ["latest", *user_aliases])
            return self._record(c, vid)

    def unlink_version(self, version_id: str) -> None:
        """Remove a link (a portfolio member); the source version is untouched."""
        rec = self.get_version(version_id)
        if rec.source_entity is None:
            raise ConflictError("this version is not linked into a portfolio; use delete() to delete it")
        self.delete_version(version_id, delete_aliases=True)

    def _default_ttl_of_collection(self, c: Connection, collection_id: int) -> float | None:
        q = (sa.select(t.entities.c.default_ttl_seconds)
             .join(t.projects, t.projects.c.entity_id == t.entities.c.id)
             .join(t.collections, t.collections.c.project_id == t.projects.c.id)
             .where(t.collections.c.id == collection_id))
        return c.execute(q).scalar()

    def get_entity_default_ttl(self, entity: str) -> float | None:
        """The TTL (seconds) new versions of ``entity`` inherit; None: they never expire."""
        with self._read() as c:
            eid = self._entity_id(c, entity)
            return c.execute(sa.select(t.entities.c.default_ttl_seconds).where(t.entities.c.id == eid)).scalar()

    def set_entity_default_ttl(self, entity: str, ttl_seconds: float | None) -> None:
        ttl_seconds = names.validate_ttl(ttl_seconds)  # type: ignore[assignment]
        with self._write() as c:
            eid = self._entity_id(c, entity, create=True)
            c.execute(t.entities.update().where(t.entities.c.id == eid).values(default_ttl_seconds=ttl_seconds))

    def gc_expired(self, now: dt.datetime | None = None) -> list[VersionRecord]:
        """Delete every version whose TTL has run out (aliases go with it); returns them."""
        now = now or utcnow()
        with self._read() as c:
            rows = c.execute(self._version_query().where(t.versions.c.ttl_seconds.is_not(None),
                                                         t.versions.c.state == "COMMITTED")).all()
            expired = [r for r in self._records(c, rows) if _expired(r, now)]
        done = []
        for rec in expired:
            # One version's trouble never stops the sweep for the others (of any entity).
            try:
                self.delete_version(rec.id, delete_aliases=True)
                done.append(rec)
            except NotFoundError:
                pass  # deleted concurrently
            except Exception:  # noqa: BLE001 - logged; the next sweep tries again
                log.exception("ttl gc: could not delete expired version %s", rec.id)
        return done
