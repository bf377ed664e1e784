"""The registry core shared by the embedded store and the server."""

from .blobs import BlobBackend, LocalBlobBackend
from .core import RegistryCore

__all__ = ["BlobBackend", "LocalBlobBackend", "RegistryCore"]
