"""What ``artifactfs get`` and ``artifactfs log`` pay before their first transfer (issue 17).

At a few hundred small files a cold ``get`` is mostly start-up: the interpreter, the imports,
the first round trips.  Real CLI processes against a real registry server (SQLite + a blob
directory, and PostgreSQL + S3 on moto): each run records the modules it imported (at exit)
and the server counts the requests it answered (/metrics).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.server_fixtures import ROOT, SharedRegistry, moto_s3, postgres, registry  # noqa: F401

pytestmark = pytest.mark.timeout(180)

#: runs the CLI as the console script does, and writes sorted(sys.modules) when it exits
RECORDING_CLI = """
import atexit, json, os, sys
atexit.register(lambda: open(os.environ["RECORD_MODULES"], "w").write(json.dumps(sorted(sys.modules))))
from client.cli import main
main(sys.argv[1:])
"""

#: top-level packages a get or log against a server has no use for: the HTTP store speaks
#: urllib3 (requests only for http:// references), the registry core and SQLAlchemy are the
#: embedded store's and the server's, boto3 the server's and s3:// references', and the rest
#: belongs to the mount or the server
NOT_FOR_A_REMOTE_CLI = ("requests", "charset_normalizer", "sqlalchemy", "alembic", "boto3", "botocore",
                        "mountfs", "pyfuse3", "trio", "server", "fastapi", "uvicorn", "psycopg", "pandas", "numpy")


def cli(registry: SharedRegistry, key: str, tmp: Path, *args: str) -> tuple[str, list[str]]:
    """Run ``artifactfs ARGS`` in a process of its own; (stdout, the modules it had imported)."""
    record = tmp / f"modules-{len(list(tmp.glob('modules-*')))}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARTIFACTFS_")}
    env.update(ARTIFACTFS_STORE=registry.server.url, ARTIFACTFS_API_KEY=key, ARTIFACTFS_CACHE_DIR=str(tmp / "cache"),
               RECORD_MODULES=str(record), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", RECORDING_CLI, *args], env=env, cwd=tmp, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, json.loads(record.read_text())


def requests_answered(url: str) -> dict[str, float]:
    """The server's answers so far by route (all workers)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for sample in fam.samples:
            if sample.name == "artifactfs_http_requests_total":
                route = sample.labels["route"]
                out[route] = out.get(route, 0) + sample.value
    return out


def heavy(modules: list[str]) -> list[str]:
    return sorted({m.split(".")[0] for m in modules} & set(NOT_FOR_A_REMOTE_CLI))


def test_remote_log_and_get_import_no_requests_nor_other_heavy_packages(registry: SharedRegistry,
                                                                         tmp_path: Path) -> None:
    """Issue 17: the requests package alone cost a cold get about 16 ms of imports with
    compiled modules (24 ms without: bench/cli_start); nothing of it is used on this path."""
    user, key = registry.new_user("boot")
    src = tmp_path / "src"
    files = {f"d{i % 3}/f{i}.bin": os.urandom(1000 + i) for i in range(12)}
    files["empty"] = b""  # a 0-byte upload too
    files["big.bin"] = os.urandom((12 << 20) + 5)  # above the test server's multipart threshold
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)

    out, modules = cli(registry, key, tmp_path, "log", str(src), "--name", f"{user}/proj/ds", "--type", "dataset")
    assert f"{user}/proj/ds:v0" in out and f"{len(files)} files" in out
    assert heavy(modules) == [], "log imported them"

    dest, elsewhere = tmp_path / "got", tmp_path / "another-machine"  # its own, empty cache
    elsewhere.mkdir()
    out, modules = cli(registry, key, elsewhere, "get", f"{user}/proj/ds:v0", str(dest))
    assert f"{len(files)} files downloaded" in out
    assert {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == files
    assert heavy(modules) == [], "get imported them"


def test_a_fully_named_get_or_log_asks_no_whoami(registry: SharedRegistry, tmp_path: Path) -> None:
    """The key's default entity (a whoami round trip when no login file knows it) is needed
    only when a name leaves its entity out; a name without one still gets it."""
    user, key = registry.new_user("named")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"hello")

    def whoamis() -> float:
        return requests_answered(registry.server.url).get("/api/v1/whoami", 0)

    before = whoamis()
    cli(registry, key, tmp_path, "log", str(src), "--name", f"{user}/proj/named", "--type", "dataset")
    cli(registry, key, tmp_path, "get", f"{user}/proj/named:latest", str(tmp_path / "full"))
    assert whoamis() == before
    out, _ = cli(registry, key, tmp_path, "get", "proj/named:v0", str(tmp_path / "short"))
    assert f"{user}/proj/named:v0" in out and (tmp_path / "short" / "a.txt").read_bytes() == b"hello"
    assert whoamis() == before + 1
