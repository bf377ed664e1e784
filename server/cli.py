"""``artifactfs server`` (run the registry server) and ``artifactfs admin`` (users, teams, keys).

The lead's CLI imports this module lazily and adds :data:`server_command` and
:data:`admin_command`; ``python -m server.cli`` runs both on their own (tests use that).
Admin commands talk to the database directly, as server operators do, and need no API key.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import click
import uvicorn

if TYPE_CHECKING:  # the server stack is imported when a command runs, so `--help` stays fast
    from .auth import AuthDB

DB_HELP = "sqlite:////abs/path/registry.db (one machine) or postgresql://user@host/db"
DEFAULT_DB = "sqlite:///artifactfs-server.db"
LOG_LEVELS = ["critical", "error", "warning", "info", "debug"]
#: uvicorn's event loop and HTTP parser: uvloop and httptools (C) cost a request about half the
#: Python calls of asyncio's loop and h11 (tests/test_server_overhead.py counts them)
PROTOCOLS: dict[str, Any] = {"loop": "uvloop", "http": "httptools"}


def check_db_url(url: str, *, create: bool) -> str:
    """Refuse a --db that is surely a mistake, in one line, before anything is created."""
    from client.cli import EXIT_NOT_FOUND, EXIT_USAGE, UserError

    if not url:
        raise UserError("no database: give --db sqlite:////path/registry.db or postgresql://user@host/db "
                        "(or ARTIFACTFS_SERVER_DB)", EXIT_USAGE)
    if "://" not in url:
        hint = f"sqlite:///{url}" if url.startswith("/") else f"sqlite:///{url} (relative) or sqlite:////abs/path"
        raise UserError(f"--db {url!r} is not a database URL; did you mean {hint}?", EXIT_USAGE)
    scheme = url.split("://", 1)[0].split("+", 1)[0]
    if scheme not in ("sqlite", "postgresql", "postgres"):
        raise UserError(f"--db {url!r}: unsupported database {scheme!r}; use sqlite:/// or postgresql://", EXIT_USAGE)
    if scheme == "sqlite":
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if not path or path == ":memory:":
            raise UserError(f"--db {url!r}: give a file, e.g. sqlite:////var/lib/artifactfs/registry.db", EXIT_USAGE)
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise UserError(f"--db {url!r}: the directory {parent} does not exist (create it first)", EXIT_NOT_FOUND)
        if not create and not os.path.exists(path):
            raise UserError(f"--db {url!r}: no database at {os.path.abspath(path)} (start 'artifactfs server "
                            "--db ...' once to create it)", EXIT_NOT_FOUND)
    return url


def database_errors(url: str) -> contextlib.AbstractContextManager[None]:
    """Context: a database that cannot be reached is one line (exit 5), not a traceback."""
    import sqlalchemy.exc

    from client.cli import EXIT_UNREACHABLE, UserError

    @contextlib.contextmanager
    def guard() -> Iterator[None]:
        try:
            yield
        except sqlalchemy.exc.OperationalError as exc:
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc).splitlines()[0]
            raise UserError(f"cannot reach the database {_redact_password(url)}: {reason}", EXIT_UNREACHABLE) from None
    return guard()


def _redact_password(url: str) -> str:
    import re

    return re.sub(r"://([^:/@]+):[^@/]*@", r"://\1:***@", url)


@click.command("server")
@click.option("--db", "db_url", default=DEFAULT_DB, show_default=True, envvar="ARTIFACTFS_SERVER_DB", help=DB_HELP)
@click.option("--blobs", "blobs_url", default="./artifactfs-blobs", show_default=True, envvar="ARTIFACTFS_SERVER_BLOBS",
              help="a local directory, or s3://bucket/prefix")
@click.option("--s3-endpoint-url", default=None, envvar="ARTIFACTFS_S3_ENDPOINT_URL",
              help="endpoint of an S3-compatible store (MinIO, Ceph, moto …)")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8600, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=int, help="server processes (stateless, share the DB)")
@click.option("--url-ttl", default=300, show_default=True, type=int, help="lifetime of blob URLs, seconds")
@click.option("--gc-interval", default=3600.0, show_default=True, type=float, envvar="ARTIFACTFS_GC_INTERVAL",
              help="seconds between sweeps deleting versions whose TTL ran out (0: never)")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), envvar="ARTIFACTFS_TLS_CERT",
              help="serve HTTPS with this PEM certificate (chain); with --tls-key")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), envvar="ARTIFACTFS_TLS_KEY",
              help="the PEM private key of --tls-cert")
@click.option("--migrate", is_flag=True,
              help="first upgrade an older database to this version's schema (back it up first); "
                   "without it the server refuses to start on one")
@click.option("--log-level", default="info", show_default=True, type=click.Choice(LOG_LEVELS, case_sensitive=False))
def server_command(db_url: str, blobs_url: str, s3_endpoint_url: str | None, host: str, port: int, workers: int,
                   url_ttl: int, gc_interval: float, tls_cert: str | None, tls_key: str | None, migrate: bool,
                   log_level: str) -> None:
    """Run the registry server (HTTP API; OpenAPI at /openapi.json).

    HTTPS: give --tls-cert and --tls-key (uvicorn's own TLS), or put a reverse proxy that
    terminates TLS in front of a server listening on 127.0.0.1 (see docs/ARCHITECTURE.md).
    A new database is created; an older one is upgraded only with --migrate
    (docs/OPERATIONS.md, "Schema migrations").
    """
    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("give both --tls-cert and --tls-key (or neither)")
    check_db_url(db_url, create=True)
    os.environ["ARTIFACTFS_GC_INTERVAL"] = str(gc_interval)
    os.environ["ARTIFACTFS_SERVER_DB"] = db_url
    os.environ["ARTIFACTFS_SERVER_BLOBS"] = blobs_url
    os.environ["ARTIFACTFS_URL_TTL"] = str(url_ttl)
    os.environ["ARTIFACTFS_LOG_LEVEL"] = log_level
    if s3_endpoint_url:
        os.environ["ARTIFACTFS_S3_ENDPOINT_URL"] = s3_endpoint_url
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Each worker writes its metrics there; /metrics on any worker sums them all.
        import tempfile

        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="artifactfs-metrics-")
    # Fail fast on a bad --db/--blobs (or a schema to migrate) before uvicorn forks workers.
    from client.cli import UserError
    from client.errors import SchemaVersionError

    from .app import Server

    with database_errors(db_url):
        try:
            Server(db_url, blobs_url, s3_endpoint_url, url_ttl, migrate=migrate).close()
        except SchemaVersionError as exc:
            raise UserError(str(exc)) from None
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = TcpConfig("server.app:create_app", factory=True, host=host, port=port, workers=workers,
                        log_level=log_level, **PROTOCOLS, access_log=False, timeout_keep_alive=30,
                        ssl_certfile=tls_cert, ssl_keyfile=tls_key)
    server = uvicorn.Server(config)
    if workers > 1:
        from uvicorn.supervisors import Multiprocess

        os.environ["PYTHONSAFEPATH"] = "1"  # spawned workers must not import from the cwd (client/pyexec.py)
        Multiprocess(config, sockets=[config.bind_socket()]).run()
    else:
        config.load_app()
        server.run()


class TcpConfig(uvicorn.Config):
    """uvicorn.Config whose shared listening socket says it is TCP.

    uvicorn creates it with ``proto=0``, and asyncio only sets TCP_NODELAY on accepted sockets
    whose ``proto`` is IPPROTO_TCP: multi-worker servers then Nagle their responses and each
    keep-alive request waits ~40 ms for a delayed ACK (measured: 45 ms vs 3 ms per call).
    (uvloop, the loop :data:`PROTOCOLS` asks for, sets TCP_NODELAY on every TCP transport itself;
    this keeps a server started on asyncio's loop right too.)
    Module level so worker processes (spawned) can unpickle it.
    """

    def bind_socket(self) -> socket.socket:
        sock = super().bind_socket()
        tcp = socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, fileno=sock.detach())
        tcp.set_inheritable(True)
        return tcp


class _AdminGroup(click.Group):
    """Database errors of any admin command are one line (exit 5)."""

    def invoke(self, ctx: click.Context) -> object:
        with database_errors(ctx.params.get("db_url") or ""):
            return super().invoke(ctx)


@click.group("admin", cls=_AdminGroup)
@click.option("--db", "db_url", default=None, envvar="ARTIFACTFS_SERVER_DB",
              help=DB_HELP + " [required; env ARTIFACTFS_SERVER_DB]")
@click.pass_context
def admin_command(ctx: click.Context, db_url: str | None) -> None:
    """Manage users, teams (entities), memberships and API keys of a registry server.

    Works on the server's database directly (no API key); the database must exist.
    """
    ctx.obj = _LazyAuth(db_url or "")


class _LazyAuth:
    """The AuthDB, opened (and --db checked) on first use, so ``admin CMD --help`` needs no --db."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._db: AuthDB | None = None

    def __getattr__(self, name: str) -> Any:
        if self._db is None:
            from client.registry.core import make_engine

            from .auth import AuthDB

            check_db_url(self._url, create=False)
            self._db = AuthDB(make_engine(self._url))
        return getattr(self._db, name)


def _fail(exc: Exception) -> None:
    raise click.ClickException(str(exc))


def _print_new_key(user: str, key: str) -> None:
    """The key alone on stdout (for scripts); the warning on stderr."""
    click.echo(key)
    click.echo(f"API key for {user}: shown once (only its hash is stored); "
               f"{user} runs: artifactfs login <registry URL>", err=True)


@admin_command.command("create-user")
@click.argument("name")
@click.option("--key/--no-key", default=True, show_default=True,
              help="also create an API key and print it (once; no need for create-key)")
@click.pass_obj
def create_user(auth: AuthDB, name: str, key: bool) -> None:
    """Create a user (and its personal entity of the same name)."""
    from client.errors import ArtifactFSError

    try:
        auth.create_user(name)
        if key:
            _print_new_key(name, auth.create_key(name))
    except ArtifactFSError as exc:
        _fail(exc)


@admin_command.command("create-team")
@click.argument("name")
@click.option("--member", "members", multiple=True, help="user to add as a member (repeatable)")
@click.pass_obj
def create_team(auth: AuthDB, name: str, members: tuple[str, ...]) -> None:
    """Create a team: an entity several users share."""
    from client.errors import ArtifactFSError

    try:
        auth.create_team(name)
        for user in members:
            auth.add_member(name, user)
    except ArtifactFSError as exc:
        _fail(exc)


@admin_command.command("add-member")
@click.argument("team")
@click.argument("user")
@click.option("--role", type=click.Choice(["member", "viewer"]), default="member", show_default=True)
@click.pass_obj
def add_member(auth: AuthDB, team: str, user: str, role: str) -> None:
    """Give USER a role in TEAM (member: read+write, viewer: read)."""
    from client.errors import ArtifactFSError

    try:
        auth.add_member(team, user, role)
    except ArtifactFSError as exc:
        _fail(exc)


@admin_command.command("remove-member")
@click.argument("team")
@click.argument("user")
@click.pass_obj
def remove_member(auth: AuthDB, team: str, user: str) -> None:
    """Take USER out of TEAM (their keys stay; they lose access to the team's artifacts)."""
    auth.remove_member(team, user)


@admin_command.command("create-key")
@click.argument("user")
@click.option("--description", default=None)
@click.pass_obj
def create_key(auth: AuthDB, user: str, description: str | None) -> None:
    """Print a new API key for USER (shown once; only its hash is stored)."""
    from client.errors import ArtifactFSError

    try:
        _print_new_key(user, auth.create_key(user, description))
    except ArtifactFSError as exc:
        _fail(exc)


@admin_command.command("revoke-key")
@click.argument("key_id")
@click.pass_obj
def revoke_key(auth: AuthDB, key_id: str) -> None:
    """Revoke a key by its id (the 8 hex digits after ``afs_``)."""
    from client.errors import ArtifactFSError

    try:
        auth.revoke_key(key_id)
    except ArtifactFSError as exc:
        _fail(exc)


@admin_command.command("list-users")
@click.pass_obj
def list_users(auth: AuthDB) -> None:
    """List users with their teams and roles (TEAM:ROLE)."""
    for user, roles in auth.list_users():
        click.echo(f"{user}\t" + ", ".join(f"{t}:{r}" for t, r in roles))


@admin_command.command("list-keys")
@click.option("--user", default=None, help="only this user's keys")
@click.pass_obj
def list_keys(auth: AuthDB, user: str | None) -> None:
    """List API keys (id, user, active/revoked, created, description); never the secrets."""
    for k in auth.list_keys(user):
        state = "revoked" if k["revoked"] else "active"
        click.echo(f"{k['key_id']}\t{k['user']}\t{state}\t{k['created_at']}\t{k['description'] or ''}")


@click.group()
def main() -> None:
    """Standalone entry point: ``python -m server.cli server|admin …``."""


main.add_command(server_command)
main.add_command(admin_command)

if __name__ == "__main__":
    sys.exit(main())
