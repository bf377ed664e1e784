"""Who may do what on a registry server: users, teams (= entities), memberships and API keys.

The model is deliberately small:

* a **user** logs in with **API keys**; a key is 256 random bits shown once at creation and
  stored only as its SHA-256 (a fast hash is enough for a high-entropy secret: there is nothing
  to brute-force, unlike a password), so a database leak does not leak working keys;
* a **team** is an entity (``entity/project/collection``); creating a user also creates the
  user's personal team of the same name, as W&B does;
* a **membership** gives a user a role in a team: ``member`` (read and write) or ``viewer``
  (read only).  Every registry call names an entity, and is allowed only if the key's user is a
  member of it.  A user outside an entity gets 403 whether or not the entity exists, so
  probing names reveals nothing.

Blob URLs handed to clients are short-lived: S3 presigns them, and for the local-directory
backend the server signs its own with an HMAC whose secret lives in the database (so several
stateless server processes behind one load balancer accept each other's URLs).

The tables live next to the registry's (prefix ``auth_``) in the same database, with their own
SQLAlchemy metadata: the registry core knows nothing about users.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass

import cachetools
import sqlalchemy as sa

from client.errors import AuthenticationError, ConflictError, InvalidNameError, NotFoundError, PermissionDeniedError
from client.names import validate_entity

log = logging.getLogger(__name__)

ROLES = ("member", "viewer")
KEY_PREFIX = "afs_"
#: How long a verified key (and its memberships) is trusted before the database is asked again.
#: Bounds how late a revocation or a removed membership takes effect on a busy server.
AUTH_CACHE_SECONDS = 5.0

metadata = sa.MetaData()
TS = sa.DateTime(timezone=True)

users = sa.Table(
    "auth_users", metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("created_at", TS, nullable=False),
)
teams = sa.Table(
    "auth_teams", metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("created_at", TS, nullable=False),
)
memberships = sa.Table(
    "auth_memberships", metadata,
    sa.Column("team", sa.String(128), sa.ForeignKey("auth_teams.name", ondelete="CASCADE"), primary_key=True),
    sa.Column("user", sa.String(128), sa.ForeignKey("auth_users.name", ondelete="CASCADE"), primary_key=True),
    sa.Column("role", sa.String(16), nullable=False),
)
api_keys = sa.Table(
    "auth_api_keys", metadata,
    sa.Column("key_id", sa.String(16), primary_key=True),
    sa.Column("user", sa.String(128), sa.ForeignKey("auth_users.name", ondelete="CASCADE"), nullable=False),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("description", sa.Text, nullable=True),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("revoked", sa.Boolean, nullable=False, default=False),
)
server_secrets = sa.Table(
    "auth_server_secrets", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(128), nullable=False),
)


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Principal:
    """The caller behind a request: a user and its role in each team it belongs to."""

    user: str
    key_id: str
    roles: tuple[tuple[str, str], ...]  #: (team, role) pairs

    @property
    def teams(self) -> list[str]:
        return sorted(team for team, _ in self.roles)

    @property
    def default_entity(self) -> str:
        """Where a name without an entity goes for this key: the user's personal entity, or the
        one team the user belongs to besides it (client.credentials.entity_of agrees)."""
        others = [team for team in self.teams if team != self.user]
        return others[0] if len(others) == 1 else self.user

    def role_in(self, entity: str) -> str | None:
        for team, role in self.roles:
            if team == entity:
                return role
        return None

    def require(self, entity: str, *, write: bool = False) -> None:
        """PermissionDeniedError unless this user may read (or write) ``entity``."""
        role = self.role_in(entity)
        if role is None:
            raise PermissionDeniedError(f"user {self.user!r} is not a member of entity {entity!r}")
        if write and role == "viewer":
            raise PermissionDeniedError(f"user {self.user!r} may only read entity {entity!r} (role viewer)")


class AuthDB:
    """Users, teams, memberships and keys over SQLAlchemy Core (SQLite or PostgreSQL)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._cache: cachetools.TTLCache[str, Principal] = cachetools.TTLCache(maxsize=10_000, ttl=AUTH_CACHE_SECONDS)
        self._lock = threading.Lock()
        self._create_tables()
        self.url_secret = self._secret("url_signing").encode("ascii")

    def _create_tables(self) -> None:
        # Several server processes may start at once against a fresh database: a lost
        # CREATE TABLE race is harmless, the winner created the same tables.
        for attempt in range(3):
            try:
                metadata.create_all(self.engine, checkfirst=True)
                return
            except sa.exc.DBAPIError:
                if attempt == 2:
                    raise
                time.sleep(0.2)

    def _secret(self, name: str) -> str:
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(server_secrets.c.value).where(server_secrets.c.name == name)).first()
            if row:
                return row[0]
        try:
            with self.engine.begin() as conn:
                conn.execute(server_secrets.insert().values(name=name, value=secrets.token_hex(32)))
        except sa.exc.IntegrityError:
            pass  # another process created it first; use theirs
        with self.engine.begin() as conn:
            return conn.execute(sa.select(server_secrets.c.value).where(server_secrets.c.name == name)).scalar_one()

    # -- administration ----------------------------------------------------------------------
    def create_team(self, name: str) -> None:
        validate_entity(name)
        try:
            with self.engine.begin() as conn:
                conn.execute(teams.insert().values(name=name, created_at=_now()))
        except sa.exc.IntegrityError:
            raise ConflictError(f"team {name!r} already exists") from None

    def create_user(self, name: str) -> None:
        """A user and its personal team (entity) of the same name, of which it is a member."""
        validate_entity(name)
        try:
            with self.engine.begin() as conn:
                conn.execute(users.insert().values(name=name, created_at=_now()))
                if not conn.execute(sa.select(teams.c.name).where(teams.c.name == name)).first():
                    conn.execute(teams.insert().values(name=name, created_at=_now()))
                conn.execute(memberships.insert().values(team=name, user=name, role="member"))
        except sa.exc.IntegrityError:
            raise ConflictError(f"user {name!r} already exists (or a team of that name has members)") from None

    def add_member(self, team: str, user: str, role: str = "member") -> None:
        if role not in ROLES:
            raise InvalidNameError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        with self.engine.begin() as conn:
            self._must_exist(conn, teams, team, "team")
            self._must_exist(conn, users, user, "user")
            done = conn.execute(
                memberships.update().where(memberships.c.team == team, memberships.c.user == user).values(role=role)
            )
            if done.rowcount == 0:
                conn.execute(memberships.insert().values(team=team, user=user, role=role))
        self._cache.clear()

    def remove_member(self, team: str, user: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(memberships.delete().where(memberships.c.team == team, memberships.c.user == user))
        self._cache.clear()

    def create_key(self, user: str, description: str | None = None) -> str:
        """A new API key for ``user``; the only time its plain text exists on the server."""
        key_id = secrets.token_hex(4)
        key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        with self.engine.begin() as conn:
            self._must_exist(conn, users, user, "user")
            conn.execute(api_keys.insert().values(
                key_id=key_id, user=user, key_hash=hash_key(key), description=description,
                created_at=_now(), revoked=False,
            ))
        return key

    def revoke_key(self, key_id: str) -> None:
        with self.engine.begin() as conn:
            if conn.execute(api_keys.update().where(api_keys.c.key_id == key_id).values(revoked=True)).rowcount == 0:
                raise NotFoundError(f"no API key with id {key_id!r}")
        self._cache.clear()

    def list_users(self) -> list[tuple[str, list[tuple[str, str]]]]:
        """(user, [(team, role), …]) for every user, for the admin CLI."""
        with self.engine.connect() as conn:
            names = [r[0] for r in conn.execute(sa.select(users.c.name).order_by(users.c.name))]
            rows = conn.execute(sa.select(memberships.c.user, memberships.c.team, memberships.c.role)).all()
        by_user: dict[str, list[tuple[str, str]]] = {n: [] for n in names}
        for user, team, role in rows:
            by_user.setdefault(user, []).append((team, role))
        return [(n, sorted(by_user[n])) for n in names]

    def list_keys(self, user: str | None = None) -> list[dict[str, object]]:
        q = sa.select(api_keys.c.key_id, api_keys.c.user, api_keys.c.description, api_keys.c.created_at, api_keys.c.revoked)
        if user:
            q = q.where(api_keys.c.user == user)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q.order_by(api_keys.c.created_at))]

    @staticmethod
    def _must_exist(conn: sa.Connection, table: sa.Table, name: str, kind: str) -> None:
        if not conn.execute(sa.select(table.c.name).where(table.c.name == name)).first():
            raise NotFoundError(f"no {kind} named {name!r}")

    # -- requests ----------------------------------------------------------------------------
    def cached(self, key: str | None) -> Principal | None:
        """The principal for a key verified in the last few seconds (no database access)."""
        if not key:
            return None
        with self._lock:
            return self._cache.get(hash_key(key))

    def authenticate(self, key: str | None) -> Principal:
        """The principal behind an API key; AuthenticationError for a missing, unknown or revoked key."""
        if not key:
            raise AuthenticationError("no API key: set ARTIFACTFS_API_KEY (ask an admin for `artifactfs admin create-key`)")
        digest = hash_key(key)
        with self._lock:
            hit = self._cache.get(digest)
        if hit is not None:
            return hit
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(api_keys.c.key_id, api_keys.c.user).where(api_keys.c.key_hash == digest, api_keys.c.revoked.is_(False))
            ).first()
            if row is None:
                raise AuthenticationError("unknown or revoked API key")
            roles = conn.execute(
                sa.select(memberships.c.team, memberships.c.role).where(memberships.c.user == row.user)
            ).all()
        principal = Principal(row.user, row.key_id, tuple(sorted((t, r) for t, r in roles)))
        with self._lock:
            self._cache[digest] = principal
        return principal

    # -- server-signed blob URLs (local-directory backend) -----------------------------------
    def sign(self, op: str, entity: str, md5_hex: str, expires: int) -> str:
        msg = f"{op}\n{entity}\n{md5_hex}\n{expires}".encode("utf-8")
        return hmac.new(self.url_secret, msg, hashlib.sha256).hexdigest()

    def check_signature(self, op: str, entity: str, md5_hex: str, expires: int, signature: str) -> None:
        """PermissionDeniedError for a forged, altered or expired URL."""
        if not hmac.compare_digest(self.sign(op, entity, md5_hex, expires), signature or ""):
            raise PermissionDeniedError("invalid blob URL signature")
        if expires < time.time():
            raise PermissionDeniedError("blob URL expired; ask the server for a new one")

