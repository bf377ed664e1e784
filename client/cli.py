"""The ``artifactfs`` command line: log, get, ls, gc, ttl-default, cache, plus lazily loaded mount/umount/server.

``mount``, ``umount`` and ``server`` live in other packages (``mountfs.cli``, ``server.cli``)
with heavy dependencies (pyfuse3, FastAPI); the group imports them only when that command
runs, so ``artifactfs --help`` and the SDK commands work on a machine without them.

Errors we raise on purpose (:class:`ArtifactFSError`) print one line saying what to do and
exit with a status that tells the kind of failure (:data:`EXIT_CODES`, also in ``--help``);
a missing optional feature exits with status 2.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from . import names, settings
from .errors import ArtifactFSError, AuthenticationError, NotFoundError, StoreUnavailableError

EXIT_ERROR, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_AUTH, EXIT_UNREACHABLE = 1, 2, 3, 4, 5
#: documented in --help; scripts can tell a typo from a missing version from a dead server
EXIT_CODES = {
    0: "success",
    EXIT_ERROR: "other error",
    EXIT_USAGE: "usage: a bad option, name, URL or setting",
    EXIT_NOT_FOUND: "not found: no such store, path, entity, project, collection or version",
    EXIT_AUTH: "authentication or permission refused (check ARTIFACTFS_API_KEY)",
    EXIT_UNREACHABLE: "store unreachable: server, database or disk did not answer",
}


class UserError(click.ClickException):
    """A one-line error with one of the documented exit codes."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        # click types exit_code a ClassVar but reads it from the instance; one class serves every code
        self.exit_code = exit_code  # type: ignore[misc]

    def show(self, file: Any = None) -> None:
        click.echo(f"artifactfs: error: {self.format_message()}", err=True)


def exit_code_for(exc: BaseException) -> int:
    """The documented exit code of an error we raised on purpose."""
    from .errors import AuthenticationError, InvalidNameError, InvalidPathError, PermissionDeniedError

    if isinstance(exc, NotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(exc, (AuthenticationError, PermissionDeniedError)):
        return EXIT_AUTH
    if isinstance(exc, StoreUnavailableError):
        return EXIT_UNREACHABLE
    if isinstance(exc, (InvalidNameError, InvalidPathError, settings.SettingError)):
        return EXIT_USAGE
    return EXIT_ERROR


def check_store_location(location: str, *, must_exist: bool) -> None:
    """Refuse a store spelling that is surely a typo, before anything is created.

    A URL must be http(s); a directory must hold a registry (``registry.db``) unless the
    caller is allowed to create one (``log``).
    """
    if "://" in location or location.lower().startswith(("http:", "https:")):
        if not location.startswith(("http://", "https://")):
            raise UserError(f"store {location!r} is neither a directory nor an http:// or https:// URL", EXIT_USAGE)
        return
    root = Path(location).expanduser()
    if root.exists() and not root.is_dir():
        raise UserError(f"{root} is not a store (it is a file); give a store directory or an http(s) URL "
                        "with --store", EXIT_NOT_FOUND)
    if must_exist and not (root / "registry.db").is_file():
        raise UserError(f"no store at {root.resolve()} (check --store / ARTIFACTFS_STORE; "
                        "'artifactfs log' creates one)", EXIT_NOT_FOUND)


def _existing_store() -> Any:
    """The store for a reading command: never created by reading it."""
    from .transfer import get_store

    check_store_location(settings.store_location(), must_exist=True)
    return get_store()


#: command name -> (module, attribute, one-line help shown without importing the module)
LAZY_COMMANDS: dict[str, tuple[str, str, str]] = {
    "mount": ("mountfs.cli", "mount_command", "Mount the registry as a filesystem (FUSE)."),
    "umount": ("mountfs.cli", "umount_command", "Unmount a mounted registry."),
    "status": ("mountfs.cli", "status_command", "List live mounts with their store, cache and pid."),
    "commit": ("mountfs.cli", "commit_command", "Commit a draft on a mount now (synchronous)."),
    "server": ("server.cli", "server_command", "Run the registry server."),
    "admin": ("server.cli", "admin_command", "Manage users, teams and API keys of a registry server."),
}


class _MissingFeature(click.Command):
    """Stands in for a lazy command whose module cannot be imported."""

    def __init__(self, name: str, module: str, reason: str) -> None:
        super().__init__(name, help=f"(not installed: {reason})", context_settings={"ignore_unknown_options": True},
                         params=[click.Argument(["args"], nargs=-1, type=click.UNPROCESSED)])
        self._module, self._reason = module, reason

    def invoke(self, ctx: click.Context) -> Any:
        click.echo(f"artifactfs: the '{self.name}' feature is not installed ({self._module}: {self._reason}); "
                   "install artifactfs with its optional dependencies to use it", err=True)
        ctx.exit(2)


class LazyGroup(click.Group):
    """A group whose lazy commands are imported only when invoked (or asked for help).

    Usage errors are one line too (click's default prints the usage block and a hint).
    """

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx else "artifactfs"
            click.echo(f"artifactfs: error: {exc.format_message()} (see: {where} --help)", err=True)
            sys.exit(EXIT_USAGE)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            from .progress import say_interrupted

            say_interrupted()
            sys.exit(130)
        except OSError as exc:  # the machine said no (full disk, permissions): one line, not a traceback
            where = f": {exc.filename}" if exc.filename else ""
            hint = (" (free some space, or point ARTIFACTFS_CACHE_DIR / the target elsewhere)"
                    if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "")
            click.echo(f"artifactfs: error: {exc.strerror or exc}{where}{hint}", err=True)
            sys.exit(EXIT_ERROR)
        sys.exit(rv if isinstance(rv, int) else 0)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in LAZY_COMMANDS:
            return super().get_command(ctx, cmd_name)
        module, attr, _ = LAZY_COMMANDS[cmd_name]
        try:
            cmd = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            return _MissingFeature(cmd_name, module, str(exc) or type(exc).__name__)
        if not isinstance(cmd, click.Command):
            return _MissingFeature(cmd_name, module, f"{attr} is not a click command")
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List lazy commands with their static help, without importing them."""
        rows = []
        for name in self.list_commands(ctx):
            if name in LAZY_COMMANDS:
                rows.append((name, LAZY_COMMANDS[name][2]))
            else:
                cmd = super().get_command(ctx, name)
                if cmd is not None and not cmd.hidden:
                    rows.append((name, cmd.get_short_help_str(limit=formatter.width)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        from .progress import TransferInterrupted

        try:
            return super().invoke(ctx)
        except (KeyboardInterrupt, TransferInterrupted):
            raise click.Abort() from None  # one line and status 130 (see main), no blank line first
        except ArtifactFSError as exc:
            click.echo(f"artifactfs: error: {exc}{_hint(exc)}", err=True)
            ctx.exit(exit_code_for(exc))
        except (FileNotFoundError, NotADirectoryError) as exc:
            click.echo(f"artifactfs: error: {exc}", err=True)
            ctx.exit(EXIT_NOT_FOUND)
        except (IsADirectoryError, PermissionError) as exc:
            click.echo(f"artifactfs: error: {exc}", err=True)
            ctx.exit(EXIT_ERROR)


def _hint(exc: ArtifactFSError) -> str:
    """What to do next, for the errors whose message alone does not say it."""
    if isinstance(exc, NotFoundError):
        return " (list what exists with: artifactfs ls [ENTITY[/PROJECT[/COLLECTION]]])"
    if isinstance(exc, AuthenticationError):
        return " (log in with: artifactfs login URL, or set ARTIFACTFS_API_KEY)"
    if isinstance(exc, StoreUnavailableError):
        return " (check --store / ARTIFACTFS_STORE)"
    return ""


_EPILOG = "\b\nExit status:\n" + "\n".join(f"  {code}  {text}" for code, text in EXIT_CODES.items())


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=_EPILOG)
@click.option("--store", envvar="ARTIFACTFS_STORE", metavar="DIR|URL",
              help="Where artifacts live: a directory (embedded store) or an http(s) registry URL "
                   "[env ARTIFACTFS_STORE; default ~/.local/share/artifactfs].")
@click.version_option(package_name="artifactfs", message="%(prog)s %(version)s")
def cli(store: str | None) -> None:
    """artifactfs: versioned datasets and models (the W&B Artifacts model).

    Names are ENTITY/PROJECT/COLLECTION[:ALIAS or vN]; ENTITY and PROJECT may be omitted
    (defaults: ARTIFACTFS_ENTITY or your user name, ARTIFACTFS_PROJECT or 'uncategorized').
    """
    if store:
        check_store_location(store, must_exist=False)
        # Every layer (SDK, mount, server) reads it through client.settings; restored on exit
        # so an in-process caller (tests, notebooks) keeps its own environment.
        previous = os.environ.get("ARTIFACTFS_STORE")
        os.environ["ARTIFACTFS_STORE"] = store
        click.get_current_context().call_on_close(lambda: _restore_env("ARTIFACTFS_STORE", previous))


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _parse(name: str) -> names.ArtifactPath:
    return names.parse_artifact_path(name, default_entity=settings.default_entity,  # asked only if needed
                                     default_project=settings.default_project())


@cli.command("log")
@click.argument("directory", type=click.Path(exists=True, path_type=Path))
@click.option("--name", "-n", required=True, metavar="ENTITY/PROJECT/COLLECTION",
              help="Collection to log into (entity/project may be omitted).")
@click.option("--type", "-t", "type_", required=True, help="Artifact type, e.g. dataset or model.")
@click.option("--alias", "-a", "aliases", multiple=True, help="Alias to point at the new version (repeatable).")
@click.option("--tag", "tags", multiple=True, help="Tag for the new version (repeatable).")
@click.option("--metadata", "-m", metavar="JSON", help="Metadata as a JSON object (at most 100 keys).")
@click.option("--description", "-d", help="Description (markdown).")
@click.option("--policy", type=click.Choice(["mutable", "immutable"]), default="mutable", show_default=True,
              help="mutable copies files while hashing so later edits cannot leak into the upload.")
def log_cmd(directory: Path, name: str, type_: str, aliases: tuple[str, ...], tags: tuple[str, ...],
            metadata: str | None, description: str | None, policy: str) -> None:
    """Log DIRECTORY (or a single file) as the next version of a collection."""
    from . import progress
    from .artifact import Artifact
    from .live_run import init

    click.get_current_context().call_on_close(progress.install_sigint_handler())
    path = _parse(name)
    if path.selector:
        raise click.BadParameter("give the collection without ':' (use --alias to name the version)", param_hint="--name")
    location = settings.store_location()
    check_store_location(location, must_exist=False)
    if "://" not in location and not (Path(location).expanduser() / "registry.db").exists():
        click.echo(f"artifactfs: created a new store at {Path(location).expanduser().resolve()}", err=True)
    meta: dict[str, Any] = {}
    if metadata:
        try:
            meta = json.loads(metadata)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"not valid JSON ({exc})", param_hint="--metadata") from None
        if not isinstance(meta, dict):
            raise click.BadParameter("must be a JSON object like '{\"k\": 1}'", param_hint="--metadata")
    art = Artifact(path.collection, type_, description=description, metadata=meta)
    with progress.hashing(progress.tree_size(directory)):
        if directory.is_dir():
            art.add_dir(directory, policy=policy)  # type: ignore[arg-type]
        else:
            art.add_file(directory, policy=policy)  # type: ignore[arg-type]
    with progress.collect() as meters:
        with init(entity=path.entity, project=path.project, job_type="cli-log", reinit="create_new") as run:
            run.log_artifact(art, aliases=list(aliases), tags=list(tags))
    sent = sum(m.files_moved for m in meters)
    had = sum(m.files_present for m in meters)
    click.echo(f"{art.qualified_name}  digest {art.digest}  {art.file_count} files  {art.size} bytes  "
               f"uploaded {art.bytes_uploaded} bytes ({sent} files sent, {had} already in the store)  "
               f"aliases {','.join(art.aliases)}")


@cli.command("get")
@click.argument("name", metavar="ENTITY/PROJECT/COLLECTION[:ALIAS]")
@click.argument("dest", required=False, type=click.Path(path_type=Path))
@click.option("--path-prefix", help="Only files whose path starts with this prefix.")
@click.option("--skip-cache", is_flag=True, help="Download straight to DEST without filling the local cache.")
def get_cmd(name: str, dest: Path | None, path_prefix: str | None, skip_cache: bool) -> None:
    """Download a version (default alias: latest) into DEST (default ./artifacts/NAME:vN).

    Into a non-empty DEST this does what wandb's download does: files with the artifact's
    content are kept, a file whose content differs is OVERWRITTEN with the artifact's version
    (each one is named on stderr), and files the artifact does not hold are left alone.  So
    after Ctrl-C (exit status 130) the same command resumes where it stopped.
    """
    from . import progress
    from .api import Api

    click.get_current_context().call_on_close(progress.install_sigint_handler())
    path = _parse(name)
    _existing_store()
    art = Api().artifact(str(path) if path.selector else f"{path}:latest")
    with progress.collect() as meters:
        root = art.download(dest, skip_cache=skip_cache, path_prefix=path_prefix)
    got = sum(m.files_moved for m in meters)
    had = sum(m.files_present for m in meters)
    replaced = sorted(p for m in meters for p in m.replaced)
    for p in replaced:
        click.echo(f"artifactfs: replaced {Path(root) / p}: its content differed from {art.qualified_name}", err=True)
    click.echo(f"{art.qualified_name} -> {root}  ({got} files downloaded, {had} already present"
               f"{f', {len(replaced)} of them replacing a different local copy' if replaced else ''})")


def plural(n: int, word: str, words: str | None = None) -> str:
    """'1 version', '2 versions'; '1 entry', '2 entries' (with ``words``)."""
    return f"{n} {word}" if n == 1 else f"{n} {words or word + 's'}"


def human_size(n: float) -> str:
    """Binary units as ls -h and du -h: '8 B', '2.9 KiB', '1.0 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@cli.command("ls")
@click.argument("prefix", required=False, metavar="[ENTITY[/PROJECT[/COLLECTION]]]")
@click.option("--type", "-t", "type_", default=None, help="Only collections of this artifact type (e.g. dataset).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def ls_cmd(prefix: str | None, type_: str | None, as_json: bool) -> None:
    """List entities, projects, collections (with their aliases), or the versions of a collection."""
    parts = [p for p in (prefix or "").split("/") if p]
    if len(parts) > 3:
        raise click.BadParameter("at most ENTITY/PROJECT/COLLECTION", param_hint="PREFIX")
    store = _existing_store()
    rows: list[Any]
    if not parts:
        rows = list(store.list_entities())
        _emit(rows, as_json, None, lambda e: [e])
    elif len(parts) == 1:
        rows = [f"{parts[0]}/{p}" for p in store.list_projects(parts[0])]
        _emit(rows, as_json, None, lambda p: [p])
    elif len(parts) == 2:
        colls = [c for c in store.list_collections(parts[0], parts[1]) if type_ is None or c.type == type_]
        rows = [{"collection": f"{c.entity}/{c.project}/{c.name}", "type": c.type, "versions": c.version_count,
                 "aliases": {a: f"v{i}" for a, i in sorted(c.aliases.items())}} for c in colls]
        _emit(rows, as_json, ["COLLECTION", "TYPE", "VERSIONS", "ALIASES"],
              lambda r: [r["collection"], r["type"], plural(r["versions"], "version"),
                         ",".join(f"{a}:{v}" for a, v in r["aliases"].items()) or "-"])
    else:
        collection, _, _sel = parts[2].partition(":")
        versions = store.list_versions(parts[0], parts[1], collection)
        if type_ is not None:
            versions = [v for v in versions if v.type == type_]
        rows = [{"name": v.qualified_name, "version": f"v{v.index}", "aliases": list(v.aliases),
                 "files": v.file_count, "size": v.size, "digest": v.digest,
                 "created_at": v.created_at.isoformat()} for v in versions]
        _emit(rows, as_json, ["VERSION", "ALIASES", "FILES", "SIZE", "DIGEST", "CREATED"],
              lambda r: [r["name"], ",".join(r["aliases"]) or "-", plural(r["files"], "file"),
                         human_size(r["size"]), r["digest"], r["created_at"][:19].replace("T", " ")])


def _emit(rows: list[Any], as_json: bool, header: list[str] | None, cells: Any) -> None:
    """Rows as JSON, or tab-separated lines under a header (plain names need none)."""
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if header and rows:
        click.echo("\t".join(header))
    for row in rows:
        click.echo("\t".join(cells(row)))


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float | None:
    """'30d', '12h', '90m', '3600' (seconds), or 'none' (never expire) -> seconds or None."""
    t = text.strip().lower()
    if t in ("none", "never", "off"):
        return None
    unit = t[-1] if t and t[-1] in _DURATION_UNITS else "s"
    number = t[:-1] if t and t[-1] in _DURATION_UNITS else t
    try:
        seconds = float(number) * _DURATION_UNITS[unit]
    except ValueError:
        raise ValueError(f"invalid duration {text!r}: use e.g. 30d, 12h, 90m, 3600 or none") from None
    if seconds <= 0:
        raise ValueError(f"invalid duration {text!r}: it must be positive (or none)")
    return seconds


def format_duration(seconds: float | None) -> str:
    """The largest whole unit: 2592000 -> '30d', 5400 -> '90m'; None -> 'none'."""
    if seconds is None:
        return "none"
    for unit in ("w", "d", "h", "m"):
        size = _DURATION_UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


@cli.command("gc")
def gc_cmd() -> None:
    """Delete every version whose TTL has run out (their aliases go with them)."""
    gone = _existing_store().gc_expired()
    for v in gone:
        click.echo(f"deleted {v.qualified_name}\t{v.digest}\tttl {format_duration(v.ttl_seconds)}")
    click.echo(f"{len(gone)} expired version(s) deleted")


@cli.command("ttl-default")
@click.argument("entity")
@click.argument("duration", required=False, metavar="[DURATION|none]")
def ttl_default_cmd(entity: str, duration: str | None) -> None:
    """Show or set the TTL new versions of ENTITY inherit (e.g. 30d, 12h, none)."""
    if duration is None:
        store = _existing_store()
    else:  # setting it is a write, like log
        from .transfer import get_store

        store = get_store()
    names.validate_entity(entity)
    if duration is not None:
        try:
            seconds = parse_duration(duration)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="DURATION") from None
        store.set_entity_default_ttl(entity, seconds)
    current = store.get_entity_default_ttl(entity)
    click.echo(f"{entity}: default ttl {format_duration(current)}")


@cli.group("cache")
def cache_group() -> None:
    """Inspect or shrink the local content cache (ARTIFACTFS_CACHE_DIR)."""


#: cache subdirectories besides objects/, in the order ``cache info`` shows them
CACHE_PARTS = ("partial", "tmp", "index", "drafts", "logs")


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


@cache_group.command("info")
def cache_info() -> None:
    """Show the cache's location, its bound and the size of each part (objects, partial
    downloads, in-flight writes, manifest indexes, mount drafts, mount logs)."""
    from .cache import Cache

    info = Cache().info()
    parts = {name: _tree_bytes(info.root / name) for name in CACHE_PARTS}
    click.echo(f"root     {info.root}")
    click.echo(f"objects  {human_size(info.bytes)}  {plural(info.entries, 'entry', 'entries')}"
               f"  (bound {human_size(info.max_bytes)}; prune with: artifactfs cache prune)")
    for name, size in parts.items():
        click.echo(f"{name:<8} {human_size(size)}")
    click.echo(f"total    {human_size(info.bytes + sum(parts.values()))}")


@cache_group.command("prune")
@click.option("--max-size", metavar="SIZE", help="Shrink to this size (e.g. 10G, 0 to empty); default: the bound.")
def cache_prune(max_size: str | None) -> None:
    """Evict least recently used objects until the cache fits."""
    from .cache import Cache

    try:
        limit = settings.parse_size(max_size) if max_size is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--max-size") from None
    cache = Cache()
    freed = cache.prune(limit)
    info = cache.info()
    click.echo(f"freed {human_size(freed)}; {plural(info.entries, 'entry', 'entries')}, "
               f"{human_size(info.bytes)} remain")


from .cli_login import register as _register_login  # noqa: E402 - the login/logout/whoami block

_register_login(cli)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="artifactfs")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
