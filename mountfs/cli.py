"""``artifactfs mount`` and ``artifactfs umount`` (imported lazily by client/cli.py).

Background mode starts the daemon as a separate process in its own session (no fork of a
process that may already hold threads) and returns only once the mount is live, or fails
with the daemon's own error message when it died first.
"""

from __future__ import annotations

import json
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
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(spawn_command(options), stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
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


@click.command("mount")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--store", "store", default=None, envvar="ARTIFACTFS_STORE",
              help="Store directory or http(s) URL (default: ARTIFACTFS_STORE).")
@click.option("--cache-dir", default=None, envvar="ARTIFACTFS_CACHE_DIR", help="Local cache directory.")
@click.option("--cache-size", default=None, callback=_parse_size, help="Cache bound, e.g. 20G.")
@click.option("--alias-ttl", default=5.0, show_default=True, type=float,
              help="Seconds an alias (e.g. :latest) stays resolved before it is looked up again.")
@click.option("--allow-other", is_flag=True, help="Let other users see the mount (needs user_allow_other).")
@click.option("--foreground", "-f", is_flag=True, help="Stay in the foreground (for systemd, debugging).")
@click.option("--no-commit-on-unmount", "no_commit", is_flag=True,
              help="Keep drafts for the next mount instead of committing them at unmount.")
@click.option("--debug", is_flag=True, hidden=True)
def mount_command(mountpoint: str, store: str | None, cache_dir: str | None, cache_size: int | None,
                  alias_ttl: float, allow_other: bool, foreground: bool, debug: bool, no_commit: bool = False) -> None:
    """Mount the artifact store at MOUNTPOINT: MOUNTPOINT/<entity>/<project>/<name>:<version> (read-only);
    mkdir <name>:draft in a project for a writable draft, touch <draft>/.commit to commit it."""
    mp = Path(mount_path(mountpoint))
    if is_mounted(mp):
        raise click.ClickException(f"{mp} is already an artifactfs mount (artifactfs umount {mp})")
    mp.mkdir(parents=True, exist_ok=True)
    options = MountOptions(str(mp), store=store, cache_dir=cache_dir, cache_size=cache_size,
                           alias_ttl=alias_ttl, allow_other=allow_other, debug=debug,
                           commit_on_unmount=not no_commit)
    if foreground:
        raise SystemExit(run(options))
    from client import settings

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


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie has finished)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _report_lines(path: Path | None) -> list[dict]:
    if path is None:
        return []
    try:
        return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    except (OSError, ValueError):
        return []


@click.command("umount")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--lazy", "-z", is_flag=True, help="Detach now even if busy (finishes when no longer in use).")
@click.option("--timeout", default=3600.0, show_default=True, type=float,
              help="Seconds to wait for the daemon to finish committing drafts.")
def umount_command(mountpoint: str, lazy: bool, timeout: float) -> None:
    """Unmount an artifactfs mount; returns once the daemon has committed the drafts (exit 1 if a commit failed)."""
    mp = Path(mount_path(mountpoint))
    if not is_mounted(mp):
        raise click.ClickException(f"{mp} is not an artifactfs mount")
    try:
        info = json.loads(os.getxattr(mp, "user.artifactfs.stats"))
    except (OSError, ValueError):
        info = {}
    pid, report = info.get("pid"), info.get("unmount_report")
    report_path = Path(report) if report else None
    try:
        unmount(mp, lazy=lazy)
    except subprocess.CalledProcessError as exc:
        raise click.ClickException(f"unmount failed: {exc.stderr.strip()} (busy? try --lazy)") from None
    start = time.monotonic()
    next_note = start + 2.0
    while pid and _alive(int(pid)):
        now = time.monotonic()
        if now - start > timeout:
            raise click.ClickException(f"unmounted {mp}, but the daemon (pid {pid}) is still committing "
                                       f"after {timeout:.0f}s; see its log")
        if now >= next_note:
            done = len(_report_lines(report_path))
            click.echo(f"waiting for the daemon to commit drafts ({done} done, {now - start:.0f}s)", err=True)
            next_note = now + 5.0
        time.sleep(0.05)
    failed = False
    for line in _report_lines(report_path):
        state = line.get("state")
        if state == "created":
            click.echo(f"committed {line.get('version')} (from {line.get('draft')})")
        elif state != "noop":
            failed = True
            click.echo(f"NOT committed {line.get('draft')}: {state}: {line.get('error')}")
    click.echo(f"unmounted {mp}")
    if failed:
        raise SystemExit(1)


@click.command("commit")
@click.argument("draft", type=click.Path(file_okay=False, exists=True))
@click.option("--alias", "aliases", multiple=True, help="Alias for the new version (repeatable).")
@click.option("--tag", "tags", multiple=True, help="Tag for the new version (repeatable).")
@click.option("--description", default=None, help="Description of the new version.")
def commit_command(draft: str, aliases: tuple[str, ...], tags: tuple[str, ...], description: str | None) -> None:
    """Commit a mounted draft (MOUNT/<entity>/<project>/<coll>:draft) now and print the result;
    exit 1 if no version could be made.  Options given here replace the JSON in .commit."""
    from .draft_fs import COMMIT_XATTR, STATUS_XATTR

    options: dict = {"aliases": list(aliases), "tags": list(tags)}
    if description is not None:
        options["description"] = description
    error = None
    try:
        os.setxattr(draft, COMMIT_XATTR, json.dumps(options).encode())
    except OSError as exc:
        error = exc
    try:
        last = json.loads(os.getxattr(draft, STATUS_XATTR)).get("last_commit") or {}
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"{draft} is not a draft on an artifactfs mount ({error or exc})") from None
    state = last.get("state")
    if error is None and state in ("created", "noop"):
        click.echo(f"{state} {last.get('version')} ({last.get('blobs_uploaded', 0)} blobs, "
                   f"{last.get('bytes_uploaded', 0)} bytes uploaded)")
        return
    raise click.ClickException(f"commit failed: {state}: {last.get('error') or error}")


@click.group()
def _main() -> None:
    """Standalone entry (python -m mountfs.cli) for when the SDK CLI is not installed."""


_main.add_command(mount_command)
_main.add_command(umount_command)
_main.add_command(commit_command)

if __name__ == "__main__":
    _main()
