"""The ``artifactfs`` command line: log, get, ls, gc, ttl-default, cache, plus lazily loaded mount/umount/server.

``mount``, ``umount`` and ``server`` live in other packages (``mountfs.cli``, ``server.cli``)
with heavy dependencies (pyfuse3, FastAPI); the group imports them only when that command
runs, so ``artifactfs --help`` and the SDK commands work on a machine without them.

Errors we raise on purpose (:class:`ArtifactFSError`) print one line saying what to do and
exit with status 1; a missing optional feature exits with status 2.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from . import names, settings
from .errors import ArtifactFSError, NotFoundError, StoreUnavailableError

#: command name -> (module, attribute, one-line help shown without importing the module)
LAZY_COMMANDS: dict[str, tuple[str, str, str]] = {
    "mount": ("mountfs.cli", "mount_command", "Mount the registry as a filesystem (FUSE)."),
    "umount": ("mountfs.cli", "umount_command", "Unmount a mounted registry."),
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
    """A group whose lazy commands are imported only when invoked (or asked for help)."""

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
        try:
            return super().invoke(ctx)
        except ArtifactFSError as exc:
            click.echo(f"artifactfs: error: {exc}{_hint(exc)}", err=True)
            ctx.exit(1)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
            click.echo(f"artifactfs: error: {exc}", err=True)
            ctx.exit(1)


def _hint(exc: ArtifactFSError) -> str:
    """What to do next, for the errors whose message alone does not say it."""
    if isinstance(exc, NotFoundError):
        return " (list what exists with: artifactfs ls [ENTITY[/PROJECT[/COLLECTION]]])"
    if isinstance(exc, StoreUnavailableError):
        return " (check --store / ARTIFACTFS_STORE)"
    return ""


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
    return names.parse_artifact_path(name, default_entity=settings.default_entity(),
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
    from .artifact import Artifact
    from .run import init

    path = _parse(name)
    if path.selector:
        raise click.BadParameter("give the collection without ':' (use --alias to name the version)", param_hint="--name")
    meta: dict[str, Any] = {}
    if metadata:
        try:
            meta = json.loads(metadata)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"not valid JSON ({exc})", param_hint="--metadata") from None
        if not isinstance(meta, dict):
            raise click.BadParameter("must be a JSON object like '{\"k\": 1}'", param_hint="--metadata")
    art = Artifact(path.collection, type_, description=description, metadata=meta)
    if directory.is_dir():
        art.add_dir(directory, policy=policy)  # type: ignore[arg-type]
    else:
        art.add_file(directory, policy=policy)  # type: ignore[arg-type]
    with init(entity=path.entity, project=path.project, job_type="cli-log", reinit="create_new") as run:
        run.log_artifact(art, aliases=list(aliases), tags=list(tags))
    click.echo(f"{art.qualified_name}  digest {art.digest}  {art.file_count} files  {art.size} bytes  "
               f"uploaded {art.bytes_uploaded} bytes  aliases {','.join(art.aliases)}")


@cli.command("get")
@click.argument("name", metavar="ENTITY/PROJECT/COLLECTION[:ALIAS]")
@click.argument("dest", required=False, type=click.Path(path_type=Path))
@click.option("--path-prefix", help="Only files whose path starts with this prefix.")
@click.option("--skip-cache", is_flag=True, help="Download straight to DEST without filling the local cache.")
def get_cmd(name: str, dest: Path | None, path_prefix: str | None, skip_cache: bool) -> None:
    """Download a version (default alias: latest) into DEST (default ./artifacts/NAME:vN)."""
    from .api import Api

    path = _parse(name)
    art = Api().artifact(str(path) if path.selector else f"{path}:latest")
    root = art.download(dest, skip_cache=skip_cache, path_prefix=path_prefix)
    click.echo(f"{art.qualified_name} -> {root}")


@cli.command("ls")
@click.argument("prefix", required=False, metavar="[ENTITY[/PROJECT[/COLLECTION]]]")
def ls_cmd(prefix: str | None) -> None:
    """List entities, projects, collections, or the versions of a collection."""
    from .transfer import get_store

    store = get_store()
    parts = [p for p in (prefix or "").split("/") if p]
    if len(parts) > 3:
        raise click.BadParameter("at most ENTITY/PROJECT/COLLECTION", param_hint="PREFIX")
    if not parts:
        for e in store.list_entities():
            click.echo(e)
    elif len(parts) == 1:
        for p in store.list_projects(parts[0]):
            click.echo(f"{parts[0]}/{p}")
    elif len(parts) == 2:
        for c in store.list_collections(parts[0], parts[1]):
            click.echo(f"{c.entity}/{c.project}/{c.name}\t{c.type}\t{c.version_count} versions")
    else:
        collection, _, _sel = parts[2].partition(":")
        for v in store.list_versions(parts[0], parts[1], collection):
            click.echo(f"{v.qualified_name}\t{','.join(v.aliases) or '-'}\t{v.file_count} files\t{v.size} bytes\t"
                       f"{v.digest}\t{v.created_at:%Y-%m-%d %H:%M:%S}")


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
    from .transfer import get_store

    gone = get_store().gc_expired()
    for v in gone:
        click.echo(f"deleted {v.qualified_name}\t{v.digest}\tttl {format_duration(v.ttl_seconds)}")
    click.echo(f"{len(gone)} expired version(s) deleted")


@cli.command("ttl-default")
@click.argument("entity")
@click.argument("duration", required=False, metavar="[DURATION|none]")
def ttl_default_cmd(entity: str, duration: str | None) -> None:
    """Show or set the TTL new versions of ENTITY inherit (e.g. 30d, 12h, none)."""
    from .transfer import get_store

    store = get_store()
    names.validate_entity(entity)
    if duration is not None:
        try:
            seconds = parse_duration(duration)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="DURATION") from None
        store.set_entity_default_ttl(entity, seconds)
    from .api import _store_method  # a server may not offer it yet: a clear error, not AttributeError

    current = _store_method(store, "get_entity_default_ttl")(entity)
    click.echo(f"{entity}: default ttl {format_duration(current)}")


@cli.group("cache")
def cache_group() -> None:
    """Inspect or shrink the local content cache (ARTIFACTFS_CACHE_DIR)."""


@cache_group.command("info")
def cache_info() -> None:
    """Show the cache's location, size and bound."""
    from .cache import Cache

    info = Cache().info()
    click.echo(f"root {info.root}\nentries {info.entries}\nbytes {info.bytes}\nmax_bytes {info.max_bytes}")


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
    click.echo(f"freed {freed} bytes; {info.entries} entries, {info.bytes} bytes remain")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="artifactfs")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
