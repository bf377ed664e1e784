"""The CLI behaves as users of rclone/mount-s3/gcsfuse/wandb expect (issue 16; issue 13 item 4).

Every test here runs the real console script (``.venv/bin/artifactfs``) in a subprocess, with
a working directory the test controls, and mounts for real where a mount is involved.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mountfs.daemon import is_mounted
from tests.mount_helpers import requires_fuse

EXE = Path(sys.executable).with_name("artifactfs")
pytestmark = pytest.mark.skipif(not EXE.exists(), reason="artifactfs console script not installed in this venv")


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    full.update(env or {})
    return subprocess.run([str(EXE), *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)


def force_unmount(mp: Path) -> None:
    if is_mounted(mp):
        subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True)
        deadline = time.monotonic() + 15
        while is_mounted(mp) and time.monotonic() < deadline:
            time.sleep(0.05)
    if is_mounted(mp):
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)


@pytest.fixture
def store_with_data(tmp_path: Path) -> Path:
    """An embedded store holding alice/proj/ds:v0 (a.txt), made through the CLI."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("A")
    store = tmp_path / "store"
    res = cli("--store", str(store), "log", str(src), "--name", "alice/proj/ds", "--type", "dataset", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    return store


@pytest.fixture
def mountpoints(tmp_path: Path) -> Iterator[list[Path]]:
    made: list[Path] = []
    yield made
    for mp in made:
        force_unmount(mp)


# -- item 1: code from the current directory never runs ------------------------------------------

@requires_fuse
def test_mount_never_imports_code_from_the_current_directory(tmp_path: Path, store_with_data: Path,
                                                               mountpoints: list[Path]) -> None:
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "pwned"
    for module in ("client", "mountfs", "server", "pyfuse3", "trio"):
        (evil / f"{module}.py").write_text(f"open({str(marker)!r}, 'a').write('{module}\\n')\n")
    mp = tmp_path / "mnt"
    mp.mkdir()
    mountpoints.append(mp)
    res = cli("mount", str(mp), "--store", str(store_with_data), "--cache-dir", str(tmp_path / "cache"), cwd=evil)
    assert res.returncode == 0, res.stderr
    assert (mp / "alice" / "proj" / "ds:v0" / "a.txt").read_text() == "A"
    force_unmount(mp)
    assert not marker.exists(), marker.read_text()


# -- item 2: typos create no state -----------------------------------------------------------------

def one_line_error(res: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_reading_commands_never_create_a_store(tmp_path: Path) -> None:
    for args in (["ls"], ["ls", "alice/proj"], ["get", "alice/proj/ds"], ["gc"]):
        res = cli("--store", "./stor-typo", *args, cwd=tmp_path)
        one_line_error(res, 3, "no store at", "stor-typo")
    assert not (tmp_path / "stor-typo").exists()


def test_store_with_an_unknown_scheme_is_refused(tmp_path: Path) -> None:
    for args in (["ls"], ["log", str(tmp_path), "--name", "ds", "--type", "dataset"]):
        res = cli("--store", "htp://registry:8600", *args, cwd=tmp_path)
        one_line_error(res, 2, "htp://", "http://")
    assert list(tmp_path.iterdir()) == []


def test_log_creates_a_store_and_says_so(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("a")
    res = cli("--store", "./fresh", "log", str(src), "--name", "alice/p/ds", "--type", "dataset", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"created a new store at {tmp_path / 'fresh'}" in res.stderr
    again = cli("--store", "./fresh", "log", str(src), "--name", "alice/p/ds", "--type", "dataset", cwd=tmp_path)
    assert again.returncode == 0 and "created a new store" not in again.stderr
    assert "alice/p/ds" in cli("--store", "./fresh", "ls", "alice/p", cwd=tmp_path).stdout


def test_admin_without_db_creates_nothing(tmp_path: Path) -> None:
    env = {"ARTIFACTFS_SERVER_DB": ""}
    res = cli("admin", "list-users", cwd=tmp_path, env=env)
    one_line_error(res, 2, "--db")
    assert list(tmp_path.iterdir()) == []


@requires_fuse
def test_mount_of_a_missing_path_fails_and_creates_nothing(tmp_path: Path, store_with_data: Path) -> None:
    deep = tmp_path / "no" / "such" / "dir"
    res = cli("mount", str(deep), "--store", str(store_with_data), cwd=tmp_path)
    one_line_error(res, 3, str(deep), "mkdir")
    assert not (tmp_path / "no").exists()


@requires_fuse
def test_mount_refuses_a_non_empty_mountpoint(tmp_path: Path, store_with_data: Path,
                                              mountpoints: list[Path]) -> None:
    mp = tmp_path / "full"
    mp.mkdir()
    (mp / "mine.txt").write_text("keep")
    res = cli("mount", str(mp), "--store", str(store_with_data), "--cache-dir", str(tmp_path / "c"), cwd=tmp_path)
    one_line_error(res, 2, "not empty", "--allow-non-empty")
    assert not is_mounted(mp)
    mountpoints.append(mp)
    res = cli("mount", str(mp), "--allow-non-empty", "--store", str(store_with_data),
              "--cache-dir", str(tmp_path / "c"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (mp / "alice" / "proj" / "ds:v0" / "a.txt").read_text() == "A"
    force_unmount(mp)
    assert (mp / "mine.txt").read_text() == "keep"


# -- item 3: one-line errors with distinct exit codes -----------------------------------------------

@pytest.mark.parametrize("args, env, code, words", [
    (["cache", "info"], {"ARTIFACTFS_CACHE_SIZE": "abc"}, 2, ["ARTIFACTFS_CACHE_SIZE", "20G"]),
    (["admin", "--db", "/path/reg.db", "list-users"], {}, 2, ["sqlite:////path/reg.db"]),
    (["admin", "--db", "sqlite:///no/such/dir/reg.db", "list-users"], {}, 3, ["no/such/dir"]),
    (["admin", "--db", "postgresql://u@127.0.0.1:1/db", "list-users"], {}, 5, ["cannot reach", "127.0.0.1:1"]),
    (["server", "--log-level", "verbose"], {}, 2, ["--log-level", "debug"]),
])
def test_user_errors_are_one_line(tmp_path: Path, args: list[str], env: dict[str, str], code: int,
                                  words: list[str]) -> None:
    one_line_error(cli(*args, cwd=tmp_path, env=env), code, *words)
    assert list(tmp_path.iterdir()) == []


@requires_fuse
def test_mount_of_a_file_as_store_is_one_line(tmp_path: Path) -> None:
    f = tmp_path / "not-a-store"
    f.write_text("x")
    mp = tmp_path / "mnt"
    mp.mkdir()
    res = cli("mount", str(mp), "--store", str(f), cwd=tmp_path)
    one_line_error(res, 3, "not a store", str(f))
    assert not is_mounted(mp)


def test_help_documents_the_exit_codes(tmp_path: Path) -> None:
    out = cli("--help", cwd=tmp_path).stdout
    for line in ("3  not found", "4  authentication", "5  store unreachable", "2  usage"):
        assert line in " ".join(out.split("\n")) or line in out, out


# -- issue 13 item 4: mount checks the store before it reports success --------------------------------

def mount_source(mp: Path) -> str:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(mp):
            return fields[fields.index("-") + 2]
    raise AssertionError(f"{mp} not mounted")


@pytest.fixture
def sqlite_server(tmp_path: Path) -> Iterator[tuple[str, str]]:
    from tests.server_fixtures import new_factory

    factory = new_factory("sqlite-local", None, tmp_path / "srv")  # type: ignore[arg-type]
    (tmp_path / "srv").mkdir()
    try:
        srv = factory.start()
        yield srv.url, factory.user("alice")
    finally:
        factory.stop_all()


@requires_fuse
def test_mount_checks_the_server_first(tmp_path: Path, sqlite_server: tuple[str, str],
                                       mountpoints: list[Path]) -> None:
    url, key = sqlite_server
    mp = tmp_path / "mnt"
    mp.mkdir()
    mountpoints.append(mp)
    common = ["--cache-dir", str(tmp_path / "cache")]
    one_line_error(cli("mount", str(mp), "--store", url, *common, cwd=tmp_path), 4, "API key")
    one_line_error(cli("mount", str(mp), "--store", url, *common, cwd=tmp_path,
                       env={"ARTIFACTFS_API_KEY": "afs_00000000_wrong"}), 4, url)
    one_line_error(cli("mount", str(mp), "--store", "http://127.0.0.1:1", *common, cwd=tmp_path,
                       env={"ARTIFACTFS_API_KEY": key}), 5, "127.0.0.1:1")
    assert not is_mounted(mp)
    res = cli("mount", str(mp), "--store", url, *common, cwd=tmp_path, env={"ARTIFACTFS_API_KEY": key})
    assert res.returncode == 0, res.stderr
    assert mount_source(mp) == f"artifactfs:{url}"
    force_unmount(mp)
    res = cli("mount", str(mp), "--lazy-connect", "--store", "http://127.0.0.1:1", *common, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert is_mounted(mp)


@requires_fuse
def test_mount_source_names_the_local_store(tmp_path: Path, store_with_data: Path, mountpoints: list[Path]) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    mountpoints.append(mp)
    res = cli("mount", str(mp), "--store", str(store_with_data), "--cache-dir", str(tmp_path / "c"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert mount_source(mp) == f"artifactfs:{store_with_data}"


# -- item 5: mount options the anchors have ---------------------------------------------------------

@requires_fuse
@pytest.mark.parametrize("flag", [["--read-only"], ["-o", "ro"]])
def test_read_only_mount_refuses_drafts(tmp_path: Path, store_with_data: Path, mountpoints: list[Path],
                                        flag: list[str]) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    mountpoints.append(mp)
    res = cli("mount", str(mp), *flag, "--store", str(store_with_data), "--cache-dir", str(tmp_path / "c"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (mp / "alice/proj/ds:v0/a.txt").read_text() == "A"
    with pytest.raises(OSError) as err:
        (mp / "alice" / "proj" / "new:draft").mkdir()
    assert err.value.errno == 30  # EROFS
    opts = next(line.split()[5] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                if line.split()[4] == str(mp))
    assert "ro" in opts.split(",")


@requires_fuse
def test_mount_owner_modes_and_logging_options(tmp_path: Path, store_with_data: Path,
                                               mountpoints: list[Path]) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    mountpoints.append(mp)
    log = tmp_path / "logs" / "m.log"
    res = cli("mount", str(mp), "--store", str(store_with_data), "--cache-dir", str(tmp_path / "c"),
              "--uid", "4242", "--gid", "4343", "--file-mode", "0440", "--dir-mode", "0550",
              "--metadata-ttl", "1", "--attr-timeout", "7", "--log-file", str(log), "--log-level", "debug",
              "-o", "default_permissions", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    f = (mp / "alice/proj/ds:v0/a.txt").stat()
    d = (mp / "alice/proj/ds:v0").stat()
    assert (f.st_uid, f.st_gid, f.st_mode & 0o7777) == (4242, 4343, 0o440)
    assert (d.st_uid, d.st_gid, d.st_mode & 0o7777) == (4242, 4343, 0o550)
    assert log.exists() and "DEBUG" in log.read_text()
    status = cli("status", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    row = next(line for line in status.stdout.splitlines() if str(mp) in line)
    assert str(store_with_data) in row and str(tmp_path / "c") in row
    header = status.stdout.splitlines()[0].split()
    assert header[:4] == ["MOUNTPOINT", "STORE", "CACHE", "PID"]
    assert Path(f"/proc/{row.split()[3]}/cmdline").read_bytes().count(b"mountfs.daemon") == 1


def test_mount_rejects_bad_log_level(tmp_path: Path) -> None:
    res = cli("mount", str(tmp_path), "--log-level", "verbose", cwd=tmp_path)
    one_line_error(res, 2, "--log-level")


@requires_fuse
def test_foreground_mount_notifies_systemd_when_live(tmp_path: Path, store_with_data: Path,
                                                     mountpoints: list[Path]) -> None:
    import socket

    mp = tmp_path / "mnt"
    mp.mkdir()
    mountpoints.append(mp)
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(60)
    full = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    full["NOTIFY_SOCKET"] = str(sock_path)
    proc = subprocess.Popen([str(EXE), "mount", "-f", str(mp), "--store", str(store_with_data),
                             "--cache-dir", str(tmp_path / "c")], cwd=tmp_path, env=full,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        msg = sock.recv(4096).decode()
        assert "READY=1" in msg.split("\n")
        assert is_mounted(mp)  # live when READY=1 arrives
    finally:
        force_unmount(mp)
        proc.wait(timeout=30)
        sock.close()


# -- item 8: the mount log rotates and holds no secrets ---------------------------------------------

def test_log_redaction_of_signatures_and_keys() -> None:
    from mountfs.daemon import redact

    line = ("GET https://b.s3.amazonaws.com/blobs/ab/cd?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA123%2F2026"
            "&X-Amz-Signature=deadbeef01&X-Amz-Expires=300 failed; key afs_0a1b2c3d_SECRETSECRET; "
            "Authorization: Bearer afs_0a1b2c3d_SECRETSECRET; http://127.0.0.1/blobdata/e/x?exp=1&sig=abc123")
    out = redact(line)
    for secret in ("deadbeef01", "AKIA123", "SECRETSECRET", "abc123"):
        assert secret not in out, out
    assert "X-Amz-Algorithm=AWS4" in out and "afs_0a1b2c3d_***" in out and "/blobs/ab/cd" in out


@requires_fuse
def test_mount_log_rotates(tmp_path: Path, store_with_data: Path, mountpoints: list[Path]) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    mountpoints.append(mp)
    log = tmp_path / "m.log"
    for _ in range(4):  # each mount/unmount cycle logs ~1 KiB at debug level
        res = cli("mount", str(mp), "--store", str(store_with_data), "--cache-dir", str(tmp_path / "c"),
                  "--log-file", str(log), "--log-level", "debug", cwd=tmp_path,
                  env={"ARTIFACTFS_MOUNT_LOG_SIZE": "1K"})
        assert res.returncode == 0, res.stderr
        assert (mp / "alice/proj/ds:v0/a.txt").read_text() == "A"
        force_unmount(mp)
        deadline = time.monotonic() + 10
        def logged() -> str:  # the handler renames m.log while it rotates: a moment without it
            out = []
            for p in tmp_path.glob("m.log*"):
                with contextlib.suppress(FileNotFoundError):
                    out.append(p.read_text(errors="replace"))
            return "".join(out)

        while "committing drafts" not in logged() and time.monotonic() < deadline:
            time.sleep(0.05)
    rotated = sorted(p.name for p in tmp_path.glob("m.log*"))
    assert rotated[:2] == ["m.log", "m.log.1"], rotated
    assert "m.log.4" not in rotated and all(p.stat().st_size <= 2048 for p in tmp_path.glob("m.log*"))


# -- item 7: systemd units and the fstab helper -------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
PREFIX = Path(sys.executable).parent.parent  # the units' /opt/artifactfs, here: this venv
requires_systemd_analyze = pytest.mark.skipif(
    subprocess.run(["sh", "-c", "command -v systemd-analyze"], capture_output=True).returncode != 0,
    reason="systemd-analyze is not installed")


def installed_units(tmp_path: Path) -> dict[str, Path]:
    """The units as `make install-systemd` writes them, with PREFIX this venv."""
    out = {}
    for name, dest in (("artifactfs-server.service", "artifactfs-server.service"),
                       ("artifactfs-mount@.service", "artifactfs-mount@mnt-artifacts.service")):
        text = (REPO / "systemd" / name).read_text().replace("/opt/artifactfs", str(PREFIX))
        (tmp_path / dest).write_text(text)
        out[name] = tmp_path / dest
    return out


@requires_systemd_analyze
def test_units_verify_and_are_hardened(tmp_path: Path) -> None:
    units = installed_units(tmp_path)
    res = subprocess.run(["systemd-analyze", "verify", *map(str, units.values())], capture_output=True,
                         text=True, cwd=tmp_path, timeout=60)
    assert res.returncode == 0 and "artifactfs" not in res.stderr, res.stderr
    exposure = {}
    for name, path in units.items():
        out = subprocess.run(["systemd-analyze", "security", "--offline=true", str(path)], capture_output=True,
                             text=True, cwd=tmp_path, timeout=60)
        exposure[name] = float(out.stdout.strip().splitlines()[-1].split("level for")[1].split(":")[1].split()[0])
    assert exposure["artifactfs-server.service"] <= 2.0, exposure  # was 7.7 EXPOSED
    assert exposure["artifactfs-mount@.service"] <= 5.0, exposure  # was 9.6 UNSAFE
    server = units["artifactfs-server.service"].read_text()
    assert "UMask=0077" in server and "0.0.0.0" not in server.split("[Service]")[1]
    assert "--host ${ARTIFACTFS_SERVER_HOST}" in server
    listen = (REPO / "systemd" / "artifactfs-server.service.d" / "listen.conf").read_text()
    assert "Environment=ARTIFACTFS_SERVER_HOST=" in listen
    mount = units["artifactfs-mount@.service"].read_text()
    assert "Type=notify" in mount and "DeviceAllow=/dev/fuse rw" in mount
    for namespacing in ("ProtectSystem=", "PrivateTmp=", "ProtectHome=", "PrivateDevices="):
        assert f"\n{namespacing}" not in mount  # a private mount namespace would hide the FUSE mount


@requires_fuse
@pytest.mark.skipif(os.geteuid() != 0 or os.path.exists("/sbin/mount.fuse.artifactfs"),
                    reason="needs root and no installed /sbin/mount.fuse.artifactfs to install the helper briefly")
def test_fstab_helper_with_mount_t_and_env_file(tmp_path: Path, store_with_data: Path,
                                                mountpoints: list[Path]) -> None:
    helper = Path("/sbin/mount.fuse.artifactfs")
    helper.write_text((REPO / "systemd" / "mount.fuse.artifactfs").read_text()
                      .replace("/opt/artifactfs/bin", str(PREFIX / "bin")))
    helper.chmod(0o755)
    mp = tmp_path / "mnt"
    mp.mkdir()
    mountpoints.append(mp)
    env_file = tmp_path / "mount.env"
    marker = tmp_path / "ran"
    env_file.write_text(f"# the unit's own example\nARTIFACTFS_MOUNT_OPTS=--read-only --metadata-ttl 5\n"
                        f"ARTIFACTFS_CACHE_DIR=\"{tmp_path / 'hc'}\"\nX=$(touch {marker})\n")
    try:
        res = subprocess.run(["mount", "-t", "fuse.artifactfs", "-o", f"noauto,_netdev,env={env_file},uid=4242",
                              str(store_with_data), str(mp)], capture_output=True, text=True, timeout=120,
                             env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ARTIFACTFS_CACHE_DIR")})
        assert res.returncode == 0, res.stderr
        assert (mp / "alice/proj/ds:v0/a.txt").read_text() == "A"
        assert (mp / "alice/proj/ds:v0/a.txt").stat().st_uid == 4242
        with pytest.raises(OSError) as err:
            (mp / "alice" / "proj" / "x:draft").mkdir()
        assert err.value.errno == 30  # --read-only from ARTIFACTFS_MOUNT_OPTS
        assert (tmp_path / "hc").is_dir() and not marker.exists()  # data, never run as shell
    finally:
        force_unmount(mp)
        helper.unlink()


# -- item 6: a colon-free spelling of every version and alias directory -------------------------------

@requires_fuse
def test_colon_free_spelling_works_with_rsync_tar_and_pythonpath(tmp_path: Path, mountpoints: list[Path]) -> None:
    import tarfile

    src = tmp_path / "tools"
    (src / "lib").mkdir(parents=True)
    (src / "lib" / "afs_tool_mod.py").write_text("VALUE = 42\n")
    with tarfile.open(src / "arch.tar", "w") as tar:
        tar.add(src / "lib" / "afs_tool_mod.py", arcname="inner.py")
    store = tmp_path / "store"
    res = cli("--store", str(store), "log", str(src), "--name", "alice/proj/tools", "--type", "code",
              "--alias", "best", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    mp = tmp_path / "mnt"
    mp.mkdir()
    mountpoints.append(mp)
    assert cli("mount", str(mp), "--store", str(store), "--cache-dir", str(tmp_path / "c"), cwd=tmp_path).returncode == 0
    proj = mp / "alice" / "proj"
    os.chdir(proj)  # relative paths, as a user inside a project types them
    try:
        out = tmp_path / "out"
        r = subprocess.run(["rsync", "-a", "tools@v0/", str(out)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert (out / "lib" / "afs_tool_mod.py").read_text() == "VALUE = 42\n"
        r = subprocess.run(["tar", "-tf", "tools@best/arch.tar"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.split() == ["inner.py"], r.stderr
        r = subprocess.run([sys.executable, "-c", "import afs_tool_mod; print(afs_tool_mod.VALUE)"],
                           env={**os.environ, "PYTHONPATH": str(proj / "tools@latest" / "lib")},
                           capture_output=True, text=True, timeout=60)
        assert r.stdout.strip() == "42", r.stderr
        assert not os.path.exists("tools@v7") and not os.path.exists("tools@")
        assert "tools@v0" not in os.listdir(".")  # documented, not listed twice
    finally:
        os.chdir(tmp_path)


@requires_fuse
def test_colon_free_spelling_reaches_drafts(tmp_path: Path, store_with_data: Path, mountpoints: list[Path]) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    mountpoints.append(mp)
    assert cli("mount", str(mp), "--store", str(store_with_data), "--cache-dir", str(tmp_path / "c"),
               cwd=tmp_path).returncode == 0
    proj = mp / "alice" / "proj"
    (proj / "ds:draft").mkdir()  # drafts are made with the colon, as before
    os.chdir(proj)
    try:
        (Path("ds@draft") / "sub").mkdir()
        Path("ds@draft/sub/new.py").write_text("VALUE = 7\n")  # written through the colon-free name
        assert (proj / "ds:draft" / "sub" / "new.py").read_text() == "VALUE = 7\n"
        out = tmp_path / "out"
        r = subprocess.run(["rsync", "-a", "ds@draft/", str(out)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert (out / "a.txt").read_text() == "A" and (out / "sub" / "new.py").read_text() == "VALUE = 7\n"
        r = subprocess.run(["tar", "-cf", str(tmp_path / "d.tar"), "ds@draft/sub"], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        r = subprocess.run([sys.executable, "-c", "import new; print(new.VALUE)"],
                           env={**os.environ, "PYTHONPATH": str(proj / "ds@draft" / "sub")},
                           capture_output=True, text=True, timeout=60)
        assert r.stdout.strip() == "7", r.stderr
        # python -m venv refuses any path holding ':'; through the colon-free name it works
        # (its interpreter is a symbolic link, which drafts keep)
        r = subprocess.run([sys.executable, "-m", "venv", "--without-pip", "ds@draft/venv"], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        r = subprocess.run([str(proj / "ds@draft" / "venv" / "bin" / "python"), "-c", "import sys; print(sys.prefix)"],
                           capture_output=True, text=True, timeout=60)
        assert r.stdout.strip() == str(proj / "ds@draft" / "venv"), r.stderr
        assert sorted(os.listdir(".")) == ["ds:draft", "ds:latest", "ds:v0"]  # not listed twice
        assert not os.path.exists("ds@draft-nope")
    finally:
        os.chdir(tmp_path)


# -- item 10: small CLI items --------------------------------------------------------------------------

def test_ls_header_plurals_aliases_type_and_json(tmp_path: Path) -> None:
    import json

    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("a")
    store = ["--store", str(tmp_path / "store")]
    for name, type_ in (("alice/proj/ds", "dataset"), ("alice/proj/net", "model")):
        assert cli(*store, "log", str(src), "--name", name, "--type", type_, "--alias", "best", cwd=tmp_path).returncode == 0
    (src / "b").write_text("b")
    assert cli(*store, "log", str(src), "--name", "alice/proj/net", "--type", "model", cwd=tmp_path).returncode == 0
    out = cli(*store, "ls", "alice/proj", cwd=tmp_path).stdout.splitlines()
    assert out[0].split() == ["COLLECTION", "TYPE", "VERSIONS", "ALIASES"]
    assert out[1].split("\t") == ["alice/proj/ds", "dataset", "1 version", "best:v0,latest:v0"]
    assert out[2].split("\t") == ["alice/proj/net", "model", "2 versions", "best:v0,latest:v1"]
    typed = cli(*store, "ls", "--type", "model", "alice/proj", cwd=tmp_path).stdout.splitlines()
    assert [line.split("\t")[0] for line in typed[1:]] == ["alice/proj/net"]
    rows = json.loads(cli(*store, "ls", "--json", "alice/proj/net", cwd=tmp_path).stdout)
    assert [r["version"] for r in rows] == ["v0", "v1"] and rows[1]["aliases"] == ["latest"]
    assert rows[0]["files"] == 1 and rows[1]["size"] == 2
    assert json.loads(cli(*store, "ls", "--json", cwd=tmp_path).stdout) == ["alice"]
    versions = cli(*store, "ls", "alice/proj/net", cwd=tmp_path).stdout.splitlines()
    assert versions[0].split() == ["VERSION", "ALIASES", "FILES", "SIZE", "DIGEST", "CREATED"]
    assert "\t1 file\t" in versions[1] and "\t2 files\t" in versions[2]


def test_cache_info_human_units_and_every_part(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"x" * 3000)
    env = {"ARTIFACTFS_CACHE_DIR": str(tmp_path / "cache"), "ARTIFACTFS_CACHE_SIZE": "2G"}
    assert cli("--store", str(tmp_path / "s"), "log", str(src), "--name", "a/p/d", "--type", "t",
               cwd=tmp_path, env=env).returncode == 0
    (tmp_path / "cache" / "logs").mkdir(parents=True, exist_ok=True)
    (tmp_path / "cache" / "logs" / "mount-x.log").write_bytes(b"l" * 2048)
    out = cli("cache", "info", cwd=tmp_path, env=env).stdout
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert "1 entry" in lines["objects"] and "2.9 KiB" in lines["objects"] and "bound 2.0 GiB" in lines["objects"]
    for part in ("partial", "tmp", "index", "drafts"):
        assert lines[part].split()[1:] == ["0", "B"], out
    assert lines["logs"].split()[1:] == ["2.0", "KiB"]
    assert lines["total"].split()[1:] == ["4.9", "KiB"]


def test_get_onto_a_full_disk_is_one_line_enospc(tmp_path: Path) -> None:
    """Issue 10: `get` on a full disk said ENOSPC with a raw traceback."""
    from tests.test_integrity import small_tmpfs

    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(3 << 20))
    env = {"ARTIFACTFS_STORE": str(tmp_path / "store"), "ARTIFACTFS_CACHE_DIR": str(tmp_path / "cache")}
    r = cli("log", str(src), "--name", "alice/proj/big", "--type", "dataset", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    with small_tmpfs(tmp_path / "tiny", "1m") as tiny:
        r = cli("get", "alice/proj/big:v0", str(tiny / "out"), cwd=tmp_path,
                env={**env, "ARTIFACTFS_CACHE_DIR": str(tiny / "cache")})
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "No space left on device" in r.stderr and "free some space" in r.stderr, r.stderr


# -- item 10: get into a non-empty folder does what wandb's download does, and says so -----------

def test_get_into_a_non_empty_folder_overwrites_differing_files_and_says_so(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for name, text in {"a.txt": "A", "sub/b.txt": "B", "c.txt": "C"}.items():
        (src / name).write_text(text)
    env = {"ARTIFACTFS_STORE": str(tmp_path / "store"), "ARTIFACTFS_CACHE_DIR": str(tmp_path / "cache")}
    assert cli("log", str(src), "--name", "alice/proj/ds", "--type", "dataset", cwd=tmp_path, env=env).returncode == 0
    dest = tmp_path / "dest"
    (dest / "sub").mkdir(parents=True)
    (dest / "a.txt").write_text("A")  # same content: kept as is
    (dest / "sub" / "b.txt").write_text("edited locally")  # differs: overwritten, and named
    (dest / "extra.txt").write_text("mine")  # not in the artifact: left alone
    ino = (dest / "a.txt").stat().st_ino

    res = cli("get", "alice/proj/ds:v0", str(dest), cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    assert "2 files downloaded, 1 already present, 1 of them replacing a different local copy" in res.stdout
    assert res.stderr.strip().splitlines() == [
        f"artifactfs: replaced {dest / 'sub' / 'b.txt'}: its content differed from alice/proj/ds:v0"]
    assert (dest / "sub" / "b.txt").read_text() == "B" and (dest / "c.txt").read_text() == "C"
    assert (dest / "a.txt").stat().st_ino == ino
    assert (dest / "extra.txt").read_text() == "mine"
    helptext = cli("get", "--help", cwd=tmp_path).stdout
    assert "OVERWRITTEN" in helptext and "left alone" in helptext


# -- item 8: the mount log names files, not blob md5s -------------------------------------------

@requires_fuse
def test_mount_log_names_the_file_of_a_corrupt_cache_object(tmp_path: Path, mountpoints: list[Path]) -> None:
    from client.cache import Cache
    from client.hashing import md5_bytes

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    payload = b"the bytes of the file\n" * 100
    (src / "sub" / "a.bin").write_bytes(payload)
    store, cache_dir, log_file = tmp_path / "store", tmp_path / "cache", tmp_path / "mount.log"
    res = cli("--store", str(store), "log", str(src), "--name", "alice/proj/ds", "--type", "dataset", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    mp = tmp_path / "mnt"
    mp.mkdir()
    mountpoints.append(mp)
    args = ["mount", str(mp), "--store", str(store), "--cache-dir", str(cache_dir), "--log-file", str(log_file)]
    target = mp / "alice" / "proj" / "ds:v0" / "sub" / "a.bin"
    assert cli(*args, cwd=tmp_path).returncode == 0
    assert target.read_bytes() == payload  # fills the cache
    force_unmount(mp)

    md5 = md5_bytes(payload)
    obj = Cache(cache_dir).path(md5)
    obj.chmod(0o644)
    obj.write_bytes(b"X" * len(payload))  # same size, wrong bytes
    assert cli(*args, cwd=tmp_path).returncode == 0
    assert target.read_bytes() == payload  # served from the store, never the corrupt copy
    force_unmount(mp)
    lines = [ln for ln in log_file.read_text().splitlines() if md5 in ln]
    assert lines, log_file.read_text()
    assert all("alice/proj/ds:v0/sub/a.bin" in ln for ln in lines), lines


# -- item 5: --auto-unmount ---------------------------------------------------------------------

def _gone(pid: int) -> bool:
    """The process has exited (reaped, or a zombie whose files are closed)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _in_proc_mounts(mp: Path) -> bool:
    return any(line.split()[1] == str(mp) for line in Path("/proc/mounts").read_text().splitlines())


@requires_fuse
@pytest.mark.parametrize("auto", [True, False])
def test_auto_unmount_removes_the_mount_when_the_daemon_is_killed(tmp_path: Path, store_with_data: Path,
                                                                   mountpoints: list[Path], auto: bool) -> None:
    import re
    import signal

    mp = tmp_path / "mnt"
    mp.mkdir()
    mountpoints.append(mp)
    res = cli("mount", str(mp), "--store", str(store_with_data), "--cache-dir", str(tmp_path / "cache"),
              *(["--auto-unmount"] if auto else []), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (mp / "alice" / "proj" / "ds:v0" / "a.txt").read_text() == "A"
    pid = int(re.search(r"daemon pid (\d+)", res.stdout)[1])  # type: ignore[index]
    os.kill(pid, signal.SIGKILL)
    # bounds on the waits, not timed assertions: under load the kernel may take seconds to
    # release a killed daemon's /dev/fuse (fusermount3 unmounts once it is released)
    deadline = time.monotonic() + 60
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(pid)
    while auto and _in_proc_mounts(mp) and time.monotonic() < deadline:
        time.sleep(0.05)
    if auto:
        assert not _in_proc_mounts(mp)
        assert mp.is_dir() and list(mp.iterdir()) == []  # the plain directory again
    else:  # without it the dead mount stays behind, answering ENOTCONN (the troubleshooting case)
        assert _in_proc_mounts(mp)
        with pytest.raises(OSError) as err:
            os.listdir(mp)
        # ENOTCONN once the connection is gone; ECONNABORTED if the kernel marked it aborted
        assert err.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
        subprocess.run(["fusermount3", "-uz", str(mp)], capture_output=True)
