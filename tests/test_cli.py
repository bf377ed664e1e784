"""The artifactfs CLI: log/get/ls/cache, error lines, --store, and the lazy subcommands."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from client import cli as cli_mod
from client.cli import cli

try:
    from _sdk_fixtures import sdk_env, tree_of, write_tree  # noqa: F401
except ImportError:  # tests/ became a package
    from tests._sdk_fixtures import sdk_env, tree_of, write_tree  # noqa: F401

pytestmark = pytest.mark.usefixtures("sdk_env")
REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return res.exit_code, res.stdout, res.stderr


def test_log_get_ls_round_trip(sdk_env: dict[str, Path]) -> None:
    src = write_tree(sdk_env["tmp"] / "data", {"a.txt": "A", "sub/b.txt": "B"})
    code, out, err = run("log", str(src), "--name", "alice/proj/ds", "--type", "dataset", "--alias", "best",
                         "--alias", "prod", "--tag", "raw", "--metadata", '{"rows": 2}', "--description", "d")
    assert code == 0, err
    assert "alice/proj/ds:v0" in out and "uploaded" in out
    code, out, _ = run("log", str(src), "--name", "proj/ds", "--type", "dataset")
    assert code == 0 and "ds:v0" in out and "uploaded 0 bytes" in out  # unchanged: a no-op
    assert run("ls")[1].split() == ["alice"]
    assert run("ls", "alice")[1].split() == ["alice/proj"]
    assert "alice/proj/ds\tdataset\t1 version\tbest:v0,latest:v0,prod:v0" in run("ls", "alice/proj")[1]
    listing = run("ls", "alice/proj/ds")[1]
    assert "alice/proj/ds:v0" in listing and "best" in listing and "prod" in listing
    dest = sdk_env["tmp"] / "dest"
    code, out, _ = run("get", "alice/proj/ds:best", str(dest))
    assert code == 0 and tree_of(dest) == {"a.txt": b"A", "sub/b.txt": b"B"}
    code, _, _ = run("get", "proj/ds")  # default alias latest, default dest ./artifacts/ds:v0
    assert code == 0 and tree_of(Path("artifacts/ds:v0")) == {"a.txt": b"A", "sub/b.txt": b"B"}
    code, _, _ = run("get", "proj/ds:v0", str(sdk_env["tmp"] / "pre"), "--path-prefix", "sub/", "--skip-cache")
    assert code == 0 and tree_of(sdk_env["tmp"] / "pre") == {"sub/b.txt": b"B"}
    import client

    art = client.Api().artifact("alice/proj/ds:v0")
    assert art.metadata == {"rows": 2} and art.tags == ["raw"] and art.description == "d"


def test_log_single_file_and_immutable_policy(sdk_env: dict[str, Path]) -> None:
    f = write_tree(sdk_env["tmp"] / "m", {"model.pt": "w"}) / "model.pt"
    code, out, err = run("log", str(f), "--name", "model", "--type", "model", "--policy", "immutable")
    assert code == 0, err and "1 files" in out
    import client

    assert client.Api().artifact("model:latest").file_count == 1


@pytest.mark.parametrize("args, expect", [
    (["get", "alice/proj/missing:latest"], "artifactfs ls"),
    (["log", "{src}", "--name", "bad name", "--type", "dataset"], "letters, digits"),
    (["log", "{src}", "--name", "ds", "--type", "dataset", "--alias", "v3"], "reserved"),
    (["log", "{src}", "--name", "ds", "--type", "dataset", "--metadata", "{not json"], "JSON"),
    (["log", "{src}", "--name", "ds", "--type", "dataset", "--metadata", "[1]"], "JSON object"),
    (["log", "{src}", "--name", "ds:v1", "--type", "dataset"], "--alias"),
    (["log", "/definitely/not/here", "--name", "ds", "--type", "dataset"], "does not exist"),
    (["cache", "prune", "--max-size", "lots"], "suffix"),
    (["ls", "a/b/c/d"], "at most"),
])
def test_errors_are_one_clear_line(sdk_env: dict[str, Path], args: list[str], expect: str) -> None:
    src = write_tree(sdk_env["tmp"] / "e", {"x": "1"})
    assert run("log", str(src), "--name", "seed", "--type", "dataset")[0] == 0  # a store to read
    res = CliRunner().invoke(cli, [a.replace("{src}", str(src)) for a in args])
    assert res.exit_code != 0
    assert expect in res.stderr
    assert "Traceback" not in res.stderr and res.exception is None or isinstance(res.exception, SystemExit)


def test_store_option_selects_the_store(sdk_env: dict[str, Path]) -> None:
    src = write_tree(sdk_env["tmp"] / "s", {"x": "1"})
    other = sdk_env["tmp"] / "other-store"
    assert run("--store", str(other), "log", str(src), "--name", "ds", "--type", "dataset")[0] == 0
    assert (other / "registry.db").exists()
    code, _, err = run("ls")  # the default store (ARTIFACTFS_STORE) was not created by it
    assert code == 3 and "no store at" in err


def test_cache_info_and_prune(sdk_env: dict[str, Path]) -> None:
    src = write_tree(sdk_env["tmp"] / "c", {"x": "12345", "y": "678"})
    run("log", str(src), "--name", "ds", "--type", "dataset")
    code, out, _ = run("cache", "info")
    assert code == 0 and "objects  8 B  2 entries" in out and str(sdk_env["cache"]) in out
    code, out, _ = run("cache", "prune", "--max-size", "0")
    assert code == 0 and "freed 8 B" in out
    assert "objects  0 B  0 entries" in run("cache", "info")[1]


def test_help_everywhere() -> None:
    for args in ([], ["log"], ["get"], ["ls"], ["cache"], ["cache", "info"], ["cache", "prune"]):
        code, out, _ = run(*args, "--help")
        assert code == 0 and "Usage:" in out
    top = run("--help")[1]
    for name in ("log", "get", "ls", "cache", "mount", "umount", "server"):
        assert f"  {name} " in top


def test_help_does_not_import_fuse_or_server() -> None:
    code = textwrap.dedent("""
        import sys
        from click.testing import CliRunner
        from client.cli import cli
        res = CliRunner().invoke(cli, ["--help"])
        assert res.exit_code == 0 and "mount" in res.output, res.output
        print(sorted(m for m in ("pyfuse3", "trio", "fastapi", "uvicorn", "mountfs.cli", "server.cli") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_lazy_commands_load_on_use_or_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fake_feature.py").write_text(textwrap.dedent("""
        import click

        @click.command()
        @click.argument("where")
        def mount_command(where):
            '''Fake mount.'''
            click.echo(f"mounted at {where}")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli_mod.LAZY_COMMANDS, "mount", ("fake_feature", "mount_command", "Mount."))
    monkeypatch.setitem(cli_mod.LAZY_COMMANDS, "server", ("no_such_feature_module", "server_command", "Serve."))
    code, out, _ = run("mount", "/mnt/x")
    assert code == 0 and out.strip() == "mounted at /mnt/x"
    res = CliRunner().invoke(cli, ["server", "--port", "1"])
    assert res.exit_code == 2 and "not installed" in res.stderr


def test_console_script_entry_point(sdk_env: dict[str, Path]) -> None:
    exe = Path(sys.executable).with_name("artifactfs")
    if not exe.exists():
        pytest.skip("artifactfs console script not installed in this venv")
    src = write_tree(sdk_env["tmp"] / "s", {"x": "1"})
    assert run("log", str(src), "--name", "ds", "--type", "dataset")[0] == 0
    out = subprocess.run([str(exe), "get", "alice/proj/none:latest"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 3 and out.stderr.count("\n") == 1 and "not found" in out.stderr
    js = subprocess.run([str(exe), "cache", "info"], capture_output=True, text=True, timeout=60)
    assert js.returncode == 0 and json.dumps(str(sdk_env["cache"]))[1:-1] in js.stdout


def test_ttl_default_and_gc(sdk_env: dict[str, Path]) -> None:
    import datetime as dt

    import client

    code, out, _ = run("ttl-default", "alice", "30d")
    assert code == 0 and out.strip() == "alice: default ttl 30d"
    assert run("ttl-default", "alice")[1].strip() == "alice: default ttl 30d"
    for bad in ("soon", "0", "0.0h"):
        code, _, err = run("ttl-default", "alice", bad)
        assert code == 2 and "invalid duration" in err
    assert cli_mod.parse_duration("12h") == 43200 and cli_mod.parse_duration("90m") == 5400
    assert cli_mod.parse_duration("none") is None and cli_mod.parse_duration("3600") == 3600
    assert [cli_mod.format_duration(x) for x in (604800, 86400, 5400, 1.5, None)] == ["1w", "1d", "90m", "1.5s", "none"]
    kept = client.Artifact("kept", "dataset")
    with kept.new_file("a") as fh:
        fh.write("a")
    doomed = client.Artifact("doomed", "dataset")
    doomed.ttl = dt.timedelta(microseconds=1)  # already expired when gc runs
    with doomed.new_file("b") as fh:
        fh.write("b")
    with client.init(project="proj") as r:
        r.log_artifact(kept)
        r.log_artifact(doomed, aliases=["best"])  # aliases do not protect an expired version
    assert kept.ttl == dt.timedelta(days=30)
    code, out, _ = run("gc")
    assert code == 0 and "deleted alice/proj/doomed:v0" in out and "1 expired version(s) deleted" in out
    assert not client.Api().artifact_exists("proj/doomed:best")
    assert client.Api().artifact_exists("proj/kept:v0")
    assert run("gc")[1].strip() == "0 expired version(s) deleted"
    code, out, _ = run("ttl-default", "alice", "none")
    assert code == 0 and out.strip() == "alice: default ttl none"


# -- names log/add_dir cannot store: errors naming the path, never a silent skip ----------------
def _deep_path(base: Path, total: int) -> Path:
    """Create a file whose absolute path is longer than ``total`` bytes (built with dir fds)."""
    import os

    seg = "d" * 200
    fd = os.open(base, os.O_RDONLY)
    depth = total // (len(seg) + 1) + 1
    try:
        for _ in range(depth):
            os.mkdir(seg, dir_fd=fd)
            nfd = os.open(seg, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        os.close(os.open("deep.bin", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    return base / "/".join([seg] * depth) / "deep.bin"


@pytest.mark.parametrize("case", ["non-utf8", "over-long", "dangling-link"])
def test_log_refuses_names_it_cannot_store_and_names_the_path(sdk_env: dict[str, Path], case: str) -> None:
    import os

    src = write_tree(sdk_env["tmp"] / f"data-{case}", {"ok.txt": "fine"})
    if case == "non-utf8":
        with open(os.path.join(os.fsencode(src), b"bad\xffname.txt"), "wb") as f:
            f.write(b"x")
        expected = "bad\\xffname.txt"
    elif case == "over-long":
        deep = _deep_path(src, 4200)
        expected = "deep.bin" if len(os.fsencode(deep)) < 4096 else "File name too long"
    else:
        (src / "link.txt").symlink_to(src / "missing")
        expected = "link.txt"
    code, out, err = run("log", str(src), "--name", f"proj/ds-{case}", "--type", "dataset")
    assert code == 2, (out, err)  # bad input: the usage exit code
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("artifactfs: created a new store")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert expected in err, err
    code, out, err = run("ls", "proj")
    assert f"ds-{case}" not in out  # nothing was logged
