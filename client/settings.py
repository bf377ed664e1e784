"""Settings read from the environment in one place, so every layer agrees on them.

| variable                 | meaning                                             | default                         |
|--------------------------|-----------------------------------------------------|---------------------------------|
| ARTIFACTFS_STORE         | a directory (embedded store) or an http(s) URL      | the `login` URL, else           |
|                          |                                                     | ~/.local/share/artifactfs       |
| ARTIFACTFS_API_KEY       | API key for a registry server                       | the key saved by `login`        |
| ARTIFACTFS_CA_BUNDLE     | CA certificates (PEM) trusted for https registries  | the system store                |
| ARTIFACTFS_CACHE_DIR     | content-addressed local cache                       | ~/.cache/artifactfs             |
| ARTIFACTFS_CACHE_SIZE    | cache bound, bytes or with K/M/G/T suffix            | 20G                             |
| ARTIFACTFS_ENTITY        | default entity when a name has none                 | with a key: its user (or the    |
|                          |                                                     | user's one team); else the OS   |
|                          |                                                     | login name                      |
| ARTIFACTFS_PROJECT       | default project when a name has none                | uncategorized                   |
| ARTIFACTFS_REQUEST_TIMEOUT | most seconds one call/FUSE request waits (client/retry.py) | 30                      |
| ARTIFACTFS_ARTIFACT_DIR  | where ``download()`` puts an artifact with no root   | WANDB_ARTIFACT_DIR, ./artifacts |

Functions, not module constants: tests change the environment between cases.  Keys saved by
``artifactfs login`` live in :mod:`client.credentials` (a 0600 file); the environment wins.
"""

from __future__ import annotations

import getpass
import os
import re
from pathlib import Path

from .errors import ArtifactFSError

DEFAULT_PROJECT = "uncategorized"


class SettingError(ArtifactFSError, ValueError):
    """An environment variable holding a value artifactfs cannot use."""

    http_status = 400


def _xdg(var: str, fallback: str) -> Path:
    base = os.environ.get(var)
    return Path(base) if base else Path.home() / fallback


def store_location() -> str:
    from . import credentials

    return (os.environ.get("ARTIFACTFS_STORE") or credentials.default_server()
            or str(_xdg("XDG_DATA_HOME", ".local/share") / "artifactfs"))


def is_server_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def api_key(location: str | None = None) -> str | None:
    """ARTIFACTFS_API_KEY, else the key ``artifactfs login`` saved for the store's URL."""
    env = os.environ.get("ARTIFACTFS_API_KEY")
    if env:
        return env
    location = location or store_location()
    if not is_server_url(location):
        return None
    from . import credentials

    entry = credentials.server_entry(location)
    return str(entry["key"]) if entry and entry.get("key") else None


def ca_bundle() -> str | None:
    """ARTIFACTFS_CA_BUNDLE: a PEM file of CAs to trust for https registries (None: the system store)."""
    return os.environ.get("ARTIFACTFS_CA_BUNDLE") or None


def cache_dir() -> Path:
    env = os.environ.get("ARTIFACTFS_CACHE_DIR")
    return Path(env) if env else _xdg("XDG_CACHE_HOME", ".cache") / "artifactfs"


def cache_size() -> int:
    try:
        return parse_size(os.environ.get("ARTIFACTFS_CACHE_SIZE") or "20G")
    except ValueError as exc:
        raise SettingError(f"ARTIFACTFS_CACHE_SIZE: {exc}") from None


def transfers() -> int:
    """ARTIFACTFS_TRANSFERS: blob transfers an SDK upload or download keeps in flight (16)."""
    try:
        n = int(os.environ.get("ARTIFACTFS_TRANSFERS") or 16)
    except ValueError:
        raise SettingError("ARTIFACTFS_TRANSFERS must be a whole number") from None
    if not 1 <= n <= 256:
        raise SettingError("ARTIFACTFS_TRANSFERS must be between 1 and 256")
    return n


def transfer_memory() -> int:
    """ARTIFACTFS_TRANSFER_MEMORY: most blob bytes an SDK download holds in memory at once (256M)."""
    try:
        return max(1, parse_size(os.environ.get("ARTIFACTFS_TRANSFER_MEMORY") or "256M"))
    except ValueError as exc:
        raise SettingError(f"ARTIFACTFS_TRANSFER_MEMORY: {exc}") from None


def default_entity() -> str:
    """ARTIFACTFS_ENTITY; with an API key for a registry server, the key's user (or the one team
    that user belongs to); else the OS login name (the embedded store has no users)."""
    env = os.environ.get("ARTIFACTFS_ENTITY")
    if env:
        return env
    location = store_location()
    if is_server_url(location):
        from . import credentials

        keyed = credentials.keyed_default_entity(location, api_key(location))
        if keyed:
            return keyed
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "user"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", user) or "user"


def default_organization() -> str | None:
    """ARTIFACTFS_ORGANIZATION: the entity registries (``wandb-registry-*`` projects) live in."""
    return os.environ.get("ARTIFACTFS_ORGANIZATION") or None


def artifact_dir() -> Path:
    """Download root when ``download()`` gets none.  WANDB_ARTIFACT_DIR is honoured when ours is
    unset, so a wandb set-up keeps its layout; WANDB_CACHE_DIR is not (our cache's layout differs
    from wandb's, and the two must not share a directory)."""
    return Path(os.environ.get("ARTIFACTFS_ARTIFACT_DIR") or os.environ.get("WANDB_ARTIFACT_DIR") or "artifacts")


def default_project() -> str:
    return os.environ.get("ARTIFACTFS_PROJECT") or DEFAULT_PROJECT


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'20G', '512M', '1.5T', '4096' -> bytes (binary units); ValueError with a hint otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not m:
        raise ValueError(f"invalid size {text!r}: use a number of bytes or a suffix K, M, G, T (e.g. 20G)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])
