"""API keys saved by ``artifactfs login``, and the default entity of a keyed client.

The file is ``$XDG_CONFIG_HOME/artifactfs/credentials.json`` (default ``~/.config``), mode 0600
in a 0700 directory, written atomically::

    {"default": "https://registry.internal:8600",
     "servers": {"https://registry.internal:8600": {"key": "afs_…", "user": "alice", "entity": "vision"}}}

``default`` is the registry a client uses when ``ARTIFACTFS_STORE`` is not set; ``entity`` is
the key's default entity as the server said at login (its user, or the one team the user
belongs to), so naming ``cifar`` costs no round trip.  ``ARTIFACTFS_API_KEY`` and
``ARTIFACTFS_ENTITY`` still win over the file.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

from .atomic import atomic_write

log = logging.getLogger(__name__)


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME")
    return (Path(base) if base else Path.home() / ".config") / "artifactfs"


def credentials_path() -> Path:
    return config_dir() / "credentials.json"


def normalise_url(url: str) -> str:
    return url.strip().rstrip("/")


def load() -> dict[str, Any]:
    """The saved credentials ({} when there are none, or the file is unreadable: logged)."""
    path = credentials_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("servers", {}), dict):
        log.warning("ignoring %s: not a credentials file", path)
        return {}
    return data


def _save(data: dict[str, Any]) -> Path:
    """Write atomically, created 0600 so the key is never readable by others, not even briefly."""
    path = credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with atomic_write(path, mode=0o600) as f:
        f.write(json.dumps(data, indent=1, sort_keys=True).encode("utf-8"))
    return path


def server_entry(url: str) -> dict[str, Any] | None:
    entry = load().get("servers", {}).get(normalise_url(url))
    return entry if isinstance(entry, dict) else None


def default_server() -> str | None:
    url = load().get("default")
    return url if isinstance(url, str) and url else None


def save_login(url: str, key: str, user: str, entity: str) -> Path:
    """Remember ``key`` for ``url`` and make ``url`` the default registry."""
    data = load()
    url = normalise_url(url)
    data.setdefault("servers", {})[url] = {"key": key, "user": user, "entity": entity}
    data["default"] = url
    return _save(data)


def forget_login(url: str) -> bool:
    """Remove the key saved for ``url``; True if there was one."""
    data = load()
    url = normalise_url(url)
    if url not in data.get("servers", {}):
        return False
    del data["servers"][url]
    if data.get("default") == url:
        data.pop("default")
    _save(data)
    return True


def entity_of(identity: dict[str, Any]) -> str:
    """The default entity for a key, from the server's whoami answer: the key's user, or the
    one team the user belongs to besides their personal entity."""
    if identity.get("default_entity"):
        return str(identity["default_entity"])
    user = str(identity["user"])
    teams = [t["name"] for t in identity.get("teams", []) if t["name"] != user]
    return teams[0] if len(teams) == 1 else user


@functools.lru_cache(maxsize=16)
def _asked_entity(url: str, key: str) -> str:
    from .transfer import get_store

    return entity_of(get_store(url, api_key=key).whoami())  # type: ignore[attr-defined]


def keyed_default_entity(url: str, key: str | None) -> str | None:
    """The default entity of a client using ``key`` on the registry at ``url`` (None without a
    key): from the login file when it is that key, else asked once per process."""
    if not key:
        return None
    entry = server_entry(url)
    if entry and entry.get("key") == key and entry.get("entity"):
        return str(entry["entity"])
    return _asked_entity(normalise_url(url), key)
