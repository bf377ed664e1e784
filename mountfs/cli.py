"""``artifactfs mount`` and ``artifactfs umount`` (imported lazily by client/cli.py).

Background mode starts the daemon as a separate process in its own session (no fork of a
process that may already hold threads) and returns only once the mount is live, or fails
with the daemon's own error message when it died first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import click

from .daemon import MountOptions, is_mounted, mount_path, run, spawn_command

_START_TIMEOUT = 60.0


def _parse_size(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    from client.settings import parse_size

    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def start_background(options: MountOptions, log_path: Path, timeout: float = _START_TIMEOUT) -> int:
    """Start the daemon detached; return its pid once the mount is live."""
    from client.pyexec import safe_env

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        # cwd "/": the daemon outlives the shell and must not pin (or import from) its folder.
        proc = subprocess.Popen(spawn_command(options), stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                                cwd="/", env=safe_env())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_mounted(options.mountpoint):
            return proc.pid
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise click.ClickException(f"the mount daemon exited with status {proc.returncode}:\n{tail}")
        time.sleep(0.05)
    proc.terminate()
    raise click.ClickException(f"the mount did not come up within {timeout:.0f}s; see {log_path}")


def _absolute_store(store: str) -> str:
    """A store location that still means the same after the daemon's chdir to /."""
    if "://" in store:
        return store
    return os.path.abspath(os.path.expanduser(store))


def check_store(location: str, lazy: bool) -> None:
    """Open the store and make one authenticated call, so a mount that cannot serve never starts.

    Raises :class:`client.cli.UserError` (one line, documented exit code).  ``lazy`` checks
    only the spelling (boot ordering: the server may come up after the mount).
    """
    from client.cli import UserError, check_store_location, exit_code_for
    from client.errors import ArtifactFSError
    from client.store import open_store

    check_store_location(location, must_exist=True)
    if lazy:
        return
    try:
        store = open_store(location)
        try:
            store.list_entities()
        finally:
            store.close()
    except ArtifactFSError as exc:
        raise UserError(f"cannot mount {location}: {exc}", exit_code_for(exc)) from None


def check_mountpoint(mp: Path, allow_non_empty: bool) -> None:
    """An existing, empty directory (rclone's rule; --allow-non-empty opts out)."""
    from client.cli import EXIT_NOT_FOUND, EXIT_USAGE, UserError

    if not os.path.lexists(mp):
        raise UserError(f"mountpoint {mp} does not exist (create it first: mkdir {mp})", EXIT_NOT_FOUND)
    if not mp.is_dir():
        raise UserError(f"mountpoint {mp} is not a directory", EXIT_USAGE)
    if not allow_non_empty and any(os.scandir(mp)):
        raise UserError(f"mountpoint {mp} is not empty: mounting would hide its files "
                        "(empty it, or pass --allow-non-empty)", EXIT_USAGE)


@click.command("mount")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--store", "store", default=None, envvar="ARTIFACTFS_STORE",
              help="Store directory or http(s) URL (default: ARTIFACTFS_STORE).")
@click.option("--cache-dir", default=None, envvar="ARTIFACTFS_CACHE_DIR", help="Local cache directory.")
@click.option("--cache-size", default=None, callback=_parse_size, help="Cache bound, e.g. 20G.")
@click.option("--alias-ttl", default=5.0, show_default=True, type=float,
              help="Seconds an alias (e.g. :latest) stays resolved before it is looked up again.")
@click.option("--allow-other", is_flag=True, help="Let other users see the mount (needs user_allow_other).")
@click.option("--allow-non-empty", is_flag=True, help="Mount over a directory that holds files (they are hidden meanwhile).")
@click.option("--lazy-connect", is_flag=True,
              help="Do not check the store before mounting (boot ordering); errors then show up as EIO.")
@click.option("--foreground", "-f", is_flag=True, help="Stay in the foreground (for systemd, debugging).")
@click.option("--debug", is_flag=True, hidden=True)
def mount_command(mountpoint: str, store: str | None, cache_dir: str | None, cache_size: int | None,
                  alias_ttl: float, allow_other: bool, allow_non_empty: bool, lazy_connect: bool,
                  foreground: bool, debug: bool) -> None:
    """Mount the artifact store at MOUNTPOINT (an existing, empty directory).

    MOUNTPOINT/<entity>/<project>/<name>:<version> is read-only; mkdir <name>:draft in a
    project for a writable draft, touch <draft>/.commit to commit it.  The store is checked
    first (reachable, key accepted) unless --lazy-connect.
    """
    from client import settings
    from client.cli import UserError

    mp = Path(mount_path(mountpoint))
    if is_mounted(mp):
        raise UserError(f"{mp} is already an artifactfs mount (artifactfs umount {mp})")
    check_mountpoint(mp, allow_non_empty)
    store = _absolute_store(store or settings.store_location())
    check_store(store, lazy_connect)
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir)) if cache_dir else None
    options = MountOptions(str(mp), store=store, cache_dir=cache_dir, cache_size=cache_size,
                           alias_ttl=alias_ttl, allow_other=allow_other, debug=debug)
    if foreground:
        raise SystemExit(run(options))

    log_path = Path(cache_dir or settings.cache_dir()) / "logs" / f"mount-{str(mp).strip('/').replace('/', '_')}.log"
    pid = start_background(options, log_path)
    click.echo(f"mounted at {mp} (daemon pid {pid}, log {log_path}); unmount with: artifactfs umount {mp}")


def unmount(mountpoint: str | os.PathLike[str], lazy: bool = False) -> None:
    """Unmount (the daemon then exits cleanly); raises CalledProcessError on failure."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u"] if tool else ["umount"]
    if lazy:
        cmd.append("-z" if tool else "-l")
    subprocess.run([*cmd, str(mountpoint)], check=True, capture_output=True, text=True)


@click.command("umount")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--lazy", "-z", is_flag=True, help="Detach now even if busy (finishes when no longer in use).")
def umount_command(mountpoint: str, lazy: bool) -> None:
    """Unmount an artifactfs mount."""
    mp = Path(mount_path(mountpoint))
    if not is_mounted(mp):
        raise click.ClickException(f"{mp} is not an artifactfs mount")
    try:
        unmount(mp, lazy=lazy)
    except subprocess.CalledProcessError as exc:
        raise click.ClickException(f"unmount failed: {exc.stderr.strip()} (busy? try --lazy)") from None
    click.echo(f"unmounted {mp}")


@click.group()
def _main() -> None:
    """Standalone entry (python -m mountfs.cli) for when the SDK CLI is not installed."""


_main.add_command(mount_command)
_main.add_command(umount_command)

if __name__ == "__main__":
    _main()
