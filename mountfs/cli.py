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

from .daemon import LOG_LEVELS, MountOptions, ReadyListener, is_mounted, mount_path, run, spawn_command

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
    """Start the daemon detached; return its pid once the mount is live and the daemon says it
    is ready (sd_notify READY=1 on a socket of our own, as systemd's ``Type=notify`` waits:
    with ``--fast-path``, after the versions of recent mounts are bound)."""
    from client.pyexec import safe_env

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with ReadyListener() as listener:
        with open(log_path, "ab") as log_file:
            # cwd "/": the daemon outlives the shell and must not pin (or import from) its folder.
            proc = subprocess.Popen(spawn_command(options), stdin=subprocess.DEVNULL, stdout=log_file,
                                    stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                                    cwd="/", env={**safe_env(), "NOTIFY_SOCKET": listener.path})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if listener.ready() and is_mounted(options.mountpoint):
                return proc.pid
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise click.ClickException(f"the mount daemon exited with status {proc.returncode}:\n{tail}")
            time.sleep(0.02)
    if is_mounted(options.mountpoint):
        return proc.pid  # live but silent past the timeout: usable, as before the READY wait
    proc.terminate()
    raise click.ClickException(f"the mount did not come up within {timeout:.0f}s; see {log_path}")


def _absolute_store(store: str) -> str:
    """A store location that still means the same after the daemon's chdir to /."""
    if "://" in store:
        return store
    return os.path.abspath(os.path.expanduser(store))


def _octal(value: str, param: click.Parameter) -> int:
    try:
        mode = int(value, 8)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an octal mode like 0444") from None
    if not 0 <= mode <= 0o7777:
        raise click.BadParameter(f"{value!r} is not a permission mode (0000-7777)")
    return mode


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
@click.option("--metadata-ttl", "--alias-ttl", "alias_ttl", default=5.0, show_default=True, type=float,
              help="Seconds listings and aliases (e.g. :latest) are trusted before they are looked up again.")
@click.option("--attr-timeout", default=86400.0, show_default=True, type=float,
              help="Seconds the kernel caches entries and attributes of immutable versions.")
@click.option("--read-only", "-r", is_flag=True, help="No drafts: every write answers EROFS (also: -o ro).")
@click.option("-o", "fuse_opts", multiple=True, metavar="OPT[,OPT...]",
              help="FUSE mount options (ro, default_permissions, ...), passed through; repeatable.")
@click.option("--uid", type=int, default=None, help="Owner shown for every file (default: your user).")
@click.option("--gid", type=int, default=None, help="Group shown for every file (default: your group).")
@click.option("--file-mode", default="0444", show_default=True, callback=lambda c, p, v: _octal(v, p),
              help="Permission bits of version files (octal).")
@click.option("--dir-mode", default="0555", show_default=True, callback=lambda c, p, v: _octal(v, p),
              help="Permission bits of directories (octal).")
@click.option("--allow-other", is_flag=True, help="Let other users see the mount (needs user_allow_other).")
@click.option("--allow-root", is_flag=True, help="Let root (besides you) see the mount (needs user_allow_other).")
@click.option("--log-file", type=click.Path(dir_okay=False), default=None,
              help="Rotating daemon log (10 MiB x 3) [default: <cache>/logs/mount-<path>.log; stderr with -f].")
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default="info", show_default=True)
@click.option("--auto-unmount", is_flag=True,
              help="If the daemon dies (even by SIGKILL), the mount goes away instead of answering "
                   "ENOTCONN (FUSE's auto_unmount, via fusermount3; also: -o auto_unmount).")
@click.option("--allow-non-empty", is_flag=True, help="Mount over a directory that holds files (they are hidden meanwhile).")
@click.option("--lazy-connect", is_flag=True,
              help="Do not check the store before mounting (boot ordering); errors then show up as EIO.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve Prometheus metrics of this mount at http://ADDRESS:PORT/metrics "
                   "(0: a free port, named in the log).")
@click.option("--metrics-address", default="127.0.0.1", show_default=True, help="Address of --metrics-port.")
@click.option("--metrics-file", type=click.Path(dir_okay=False), default=None,
              help="Write the metrics to this file (node_exporter textfile) every 15 s and at unmount.")
@click.option("--foreground", "-f", is_flag=True, help="Stay in the foreground (for systemd, debugging).")
@click.option("--no-commit-on-unmount", "no_commit", is_flag=True,
              help="Keep drafts for the next mount instead of committing them at unmount.")
@click.option("--fast-path", is_flag=True,
              help="Serve :vN versions whose files are all in the cache from a read-only tree bound over "
                   "their directory (no FUSE request per file; needs root; see docs/SEMANTICS.md).")
@click.option("--stream-split", default=10.0, show_default=True, type=click.FloatRange(min=0),
              help="Give a sequential reader that waits on its one stream a second connection ahead when the "
                   "part the first keeps takes RATIO times a request's start-up to arrive, while splits "
                   "are seen to pay on this store (0: one stream per reader).", metavar="RATIO")
@click.option("--debug", is_flag=True, hidden=True)
def mount_command(mountpoint: str, store: str | None, cache_dir: str | None, cache_size: int | None,
                  alias_ttl: float, attr_timeout: float, read_only: bool, fuse_opts: tuple[str, ...],
                  uid: int | None, gid: int | None, file_mode: int, dir_mode: int, allow_other: bool,
                  allow_root: bool, log_file: str | None, log_level: str, auto_unmount: bool, allow_non_empty: bool,
                  lazy_connect: bool, foreground: bool, debug: bool, no_commit: bool = False,
                  metrics_port: int | None = None, metrics_address: str = "127.0.0.1",
                  metrics_file: str | None = None, fast_path: bool = False, stream_split: float = 10.0) -> None:
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
    if metrics_port is not None:
        from .metrics import check_address

        try:
            check_address(metrics_address, metrics_port)
        except OSError as exc:
            raise UserError(f"cannot mount: {exc.strerror}") from None
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir)) if cache_dir else None
    passthrough = [o.strip() for group in fuse_opts for o in group.split(",") if o.strip()]
    read_only = read_only or "ro" in passthrough
    allow_other = allow_other or "allow_other" in passthrough
    passthrough = [o for o in passthrough if o not in ("ro", "rw", "allow_other")]
    if auto_unmount and "auto_unmount" not in passthrough:
        passthrough.append("auto_unmount")
    cache_root = Path(cache_dir or settings.cache_dir())
    if log_file is None and not foreground:
        log_file = str(cache_root / "logs" / f"mount-{str(mp).strip('/').replace('/', '_')}.log")
    options = MountOptions(str(mp), store=store, cache_dir=str(cache_root), cache_size=cache_size,
                           alias_ttl=alias_ttl, attr_timeout=attr_timeout, allow_other=allow_other,
                           allow_root=allow_root, read_only=read_only, uid=uid, gid=gid, file_mode=file_mode,
                           dir_mode=dir_mode, fuse_options=passthrough,
                           log_file=os.path.abspath(log_file) if log_file else None, log_level=log_level.lower(),
                           debug=debug, commit_on_unmount=not no_commit, metrics_port=metrics_port,
                           metrics_address=metrics_address,
                           metrics_file=os.path.abspath(metrics_file) if metrics_file else None,
                           fast_path=fast_path, stream_split=stream_split)
    if foreground:
        raise SystemExit(run(options))

    log_path = Path(options.log_file or cache_root / "logs" / "mount.log")
    pid = start_background(options, log_path.with_name(log_path.name + ".stderr"))
    click.echo(f"mounted at {mp} (daemon pid {pid}, log {log_path}); unmount with: artifactfs umount {mp}")


def unmount(mountpoint: str | os.PathLike[str], lazy: bool = False) -> None:
    """Unmount (the daemon then exits cleanly); raises CalledProcessError on failure.

    Fast-path binds below the mount (mountfs/fastpath.py) are detached first: they would make
    a plain unmount EBUSY.  The daemon may bind a version in between: then once more (bounded).
    """
    from .fastpath import detach_binds_under

    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u"] if tool else ["umount"]
    if lazy:
        cmd.append("-z" if tool else "-l")
    for attempt in range(3):
        binds = detach_binds_under(mountpoint) if not lazy else 0
        try:
            subprocess.run([*cmd, str(mountpoint)], check=True, capture_output=True, text=True)
            return
        except subprocess.CalledProcessError:
            if not binds or attempt == 2:
                raise


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
    from .drafts.fs import COMMIT_XATTR, STATUS_XATTR

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


def list_mounts() -> list[dict[str, object]]:
    """Live artifactfs mounts of this mount namespace with their store, cache and daemon pid.

    Mountpoint and store come from mountinfo (the source ``artifactfs:<store>``); cache and
    pid from the daemon's command line (``python -m mountfs.daemon <options JSON>``, or a
    foreground ``artifactfs mount -f``).  Nothing is stat'ed on the mount: a hung daemon
    cannot hang ``status``.
    """
    from .daemon import FSNAME, _unescape

    daemons: dict[str, tuple[int, MountOptions | None]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv if a]
        if "mountfs.daemon" in args and args[-1].startswith("{"):
            try:
                opts = MountOptions.from_json(args[-1])
            except (ValueError, TypeError):
                continue
            daemons[opts.mountpoint] = (int(entry.name), opts)
        elif "mount" in args and ("-f" in args or "--foreground" in args):
            for a in args[args.index("mount") + 1:]:
                if not a.startswith("-"):
                    daemons.setdefault(mount_path(a), (int(entry.name), None))
                    break
    rows: list[dict[str, object]] = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if not fields[sep + 1].startswith(f"fuse.{FSNAME}"):
                continue
            point, source = _unescape(fields[4]), _unescape(fields[sep + 2])
            pid, found = daemons.get(point, (None, None))
            rows.append({"mountpoint": point, "store": source.removeprefix(f"{FSNAME}:"),
                         "cache": found.cache_dir if found and found.cache_dir else "-", "pid": pid,
                         "read_only": "ro" in fields[5].split(",")})
    return rows


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per mount.")
def status_command(as_json: bool) -> None:
    """List live artifactfs mounts: mountpoint, store, cache directory and daemon pid."""
    import json

    rows = list_mounts()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo("MOUNTPOINT\tSTORE\tCACHE\tPID\tMODE")
    for r in rows:
        click.echo(f"{r['mountpoint']}\t{r['store']}\t{r['cache']}\t{r['pid'] or '-'}\t{'ro' if r['read_only'] else 'rw'}")
    if not rows:
        click.echo("(no artifactfs mounts)", err=True)


@click.group()
def _main() -> None:
    """Standalone entry (python -m mountfs.cli) for when the SDK CLI is not installed."""


_main.add_command(mount_command)
_main.add_command(umount_command)
_main.add_command(status_command)
_main.add_command(commit_command)

if __name__ == "__main__":
    _main()
