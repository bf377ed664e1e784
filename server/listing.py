"""Project listings served from encoded parts, one per collection, checked by one query.

A project listing (``GET …/listing``, what a mount lists) is the same JSON for every caller
who may read the entity, and between two listings usually only a collection or two changed.
So each worker keeps, per project, every collection's part of the answer already encoded (its
record and its versions as JSON) with the collection's ``stamp``, and asks the registry only
for the parts whose stamp moved (:meth:`RegistryCore.list_project_parts`): one query when
nothing changed, three when something did, and records built only for what changed.

The answer carries an ETag made of the stamps, the same in every worker: a client that sends
it back (``If-None-Match``) gets ``304 Not Modified`` while nothing changed, with no body to
send or decode.

Never stale: every write that changes what a listing shows of a collection gives it a new
stamp in its own transaction, and the stamps are read from the database on every request, so
any number of workers (each with its own cache) see a change as soon as it is committed.
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from client.registry import RegistryCore
from client.registry.core import CollectionListing, ListingPart
from client.store.wire import record_to_json

#: encoded bytes a worker keeps, all projects together (the least recently listed go first)
MAX_BYTES = 256 << 20
#: part of every ETag: change it with the encoding, so a client never keeps an answer of another
LISTING_FORMAT = b"listing-1"


def encode(value: Any) -> bytes:
    """JSON as FastAPI's default response encodes it."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


@dataclass(frozen=True)
class EncodedPart:
    """A collection's part of a listing, encoded: its record, and its versions joined by commas."""

    stamp: int
    collection: bytes
    versions: bytes

    @property
    def size(self) -> int:
        return len(self.collection) + len(self.versions)

    @classmethod
    def of(cls, part: CollectionListing) -> EncodedPart:
        return cls(part.stamp, encode(record_to_json(part.collection)),
                   b",".join(encode(record_to_json(v)) for v in part.versions))


def etag(parts: list[ListingPart]) -> str:
    """The ETag of a listing: a digest of its collections' ids and stamps, in listing order."""
    digest = hashlib.blake2b(LISTING_FORMAT, digest_size=16)
    for p in parts:
        digest.update(struct.pack("<qq", p.id, p.stamp))
    return f'"{digest.hexdigest()}"'


@dataclass(frozen=True)
class Listing:
    """A project listing: its ETag and its JSON body."""

    etag: str
    body: bytes


class ListingCache:
    """Encoded listing parts of the projects listed lately (thread-safe; one per worker)."""

    def __init__(self, registry: RegistryCore, max_bytes: int = MAX_BYTES) -> None:
        self.registry = registry
        self.max_bytes = max_bytes
        #: (entity, project) -> (its parts by collection id, their size), least recently listed first
        self._projects: OrderedDict[tuple[str, str], tuple[dict[int, EncodedPart], int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def kept(self) -> list[tuple[str, str]]:
        """The projects whose parts are kept, least recently listed first."""
        with self._lock:
            return list(self._projects)

    def _held(self, key: tuple[str, str]) -> dict[int, EncodedPart]:
        with self._lock:
            if key not in self._projects:
                return {}
            self._projects.move_to_end(key)
            return self._projects[key][0]

    def _keep(self, key: tuple[str, str], parts: dict[int, EncodedPart]) -> None:
        size = sum(p.size for p in parts.values())
        with self._lock:
            if key in self._projects:
                self._bytes -= self._projects.pop(key)[1]
            if size > self.max_bytes:
                return  # a project larger than the budget is built every time
            self._projects[key] = (parts, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                self._bytes -= self._projects.popitem(last=False)[1][1]

    def listing(self, entity: str, project: str) -> Listing:
        """The project listing, its body the JSON of the route: ``{"collections": [...],
        "versions": [...]}`` (NotFoundError for a missing project, as the registry raises)."""
        key = (entity, project)
        held = self._held(key)
        items = self.registry.list_project_parts(entity, project, {i: p.stamp for i, p in held.items()})
        fresh = {item.id: EncodedPart.of(item.part) if item.part is not None else held[item.id] for item in items}
        self._keep(key, fresh)  # only the collections there now: a deleted one's part goes
        parts = fresh.values()
        return Listing(etag(items), b'{"collections":[' + b",".join(p.collection for p in parts) + b'],"versions":['
                       + b",".join(p.versions for p in parts if p.versions) + b"]}")
