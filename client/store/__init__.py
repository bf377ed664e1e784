"""Store selection: a directory is the embedded store, an http(s) URL is a registry server."""

from __future__ import annotations

from .base import CollectionRecord, CommitRequest, LocalBlobs, RunRecord, Store, UploadBatching, UrlBatching, VersionRecord

__all__ = ["CollectionRecord", "CommitRequest", "LocalBlobs", "RunRecord", "Store", "UploadBatching", "UrlBatching", "VersionRecord",
           "open_store"]


def open_store(location: str | None = None, api_key: str | None = None) -> Store:
    """Open the store named by ``location`` (default: ARTIFACTFS_STORE)."""
    from .. import settings

    location = location or settings.store_location()
    if settings.is_server_url(location):
        from .http import HttpStore

        return HttpStore(location, api_key=api_key or settings.api_key(location))
    from .local import LocalStore

    return LocalStore(location)
