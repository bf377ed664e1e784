"""Settings read from the environment in one place, so every layer agrees on them.

| variable                 | meaning                                             | default                         |
|--------------------------|-----------------------------------------------------|---------------------------------|
| ARTIFACTFS_STORE         | a directory (embedded store) or an http(s) URL      | ~/.local/share/artifactfs       |
| ARTIFACTFS_API_KEY       | API key for a registry server                       | none                            |
| ARTIFACTFS_CACHE_DIR     | content-addressed local cache                       | ~/.cache/artifactfs             |
| ARTIFACTFS_CACHE_SIZE    | cache bound, bytes or with K/M/G/T suffix            | 20G                             |
| ARTIFACTFS_ENTITY        | default entity when a name has none                 | the login user name             |
| ARTIFACTFS_PROJECT       | default project when a name has none                | uncategorized                   |
| ARTIFACTFS_ARTIFACT_DIR  | where ``download()`` puts an artifact with no root   | WANDB_ARTIFACT_DIR, ./artifacts |

Functions, not module constants: tests change the environment between cases.
"""

from __future__ import annotations

import getpass
import os
import re
from pathlib import Path

DEFAULT_PROJECT = "uncategorized"


def _xdg(var: str, fallback: str) -> Path:
    base = os.environ.get(var)
    return Path(base) if base else Path.home() / fallback


def store_location() -> str:
    return os.environ.get("ARTIFACTFS_STORE") or str(_xdg("XDG_DATA_HOME", ".local/share") / "artifactfs")


def api_key() -> str | None:
    return os.environ.get("ARTIFACTFS_API_KEY") or None


def cache_dir() -> Path:
    env = os.environ.get("ARTIFACTFS_CACHE_DIR")
    return Path(env) if env else _xdg("XDG_CACHE_HOME", ".cache") / "artifactfs"


def cache_size() -> int:
    return parse_size(os.environ.get("ARTIFACTFS_CACHE_SIZE") or "20G")


def default_entity() -> str:
    env = os.environ.get("ARTIFACTFS_ENTITY")
    if env:
        return env
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
