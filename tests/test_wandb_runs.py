"""W&B runs and collections as scripts use them (issue 14): ``run.log``/``run.summary`` and run
tags stored with the run so ``Api.runs(filters=...)`` matches them as the seed's examples do;
the public Run's ``update()``, ``upload_file``/``file``/``files``; ``ArtifactCollection``
``save()``/``delete()`` with settable name, description, tags and type.

Everything runs on the embedded store here; the same calls over the HTTP store against a real
server are in test_http_store.py::test_runs_and_collections_over_http.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

import client
from client.errors import ConflictError, NotFoundError
from client.store.local import LocalStore
from tests._sdk_fixtures import sdk_env, write_tree  # noqa: F401
from tests.server_fixtures import moto_s3, postgres, registry  # noqa: F401


def _ids(runs) -> list[str]:
    return [r.id for r in runs]


def _three_runs() -> list[str]:
    ids = []
    for i, (acc, tags) in enumerate([(0.3, ["base"]), (0.7, ["exp", "best"]), (0.9, ["exp"])]):
        config = {"lr": 0.1 * (i + 1), "experiment": {"category": "testing" if i else "smoke"}}
        with client.init(project="proj", config=config, tags=tags, id=f"r{i}") as run:
            run.log({"acc": acc / 2})
            run.log({"acc": acc, "model1": {"loss": 0.5 if i == 1 else 1.0}})
            run.summary["best_acc"] = acc
        ids.append(run.id)
    return ids


def test_summary_tags_and_config_are_stored_and_filter_like_the_seed(sdk_env) -> None:
    r0, r1, r2 = _three_runs()
    api = client.Api()

    def find(filters=None, order="+created_at") -> list[str]:
        return _ids(api.runs("alice/proj", filters=filters, order=order))

    assert find({"summary_metrics.acc": {"$gt": 0.5}}) == [r1, r2]
    assert find({"summary_metrics.model1.loss": 0.5}) == [r1]
    assert find({"summary_metrics.best_acc": {"$gte": 0.9}}) == [r2]
    assert find({"tags": "exp"}) == [r1, r2]
    assert find({"tags": {"$in": ["base", "best"]}}) == [r0, r1]
    assert find({"config.experiment.category": "testing"}) == [r1, r2]
    assert find({"$and": [{"state": "finished"}, {"tags": {"$nin": ["best"]}}]}) == [r0, r2]
    assert find(order="-summary_metrics.acc") == [r2, r1, r0]
    public = api.run(f"proj/{r1}")
    assert public.summary == {"acc": 0.7, "model1": {"loss": 0.5}, "best_acc": 0.7}
    assert public.summary_metrics == public.summary
    assert public.tags == ["exp", "best"]


def test_summary_is_visible_while_the_run_is_live(sdk_env) -> None:
    run = client.init(project="proj", id="live")
    run.log({"loss": float("nan"), "step_loss": 1.5})
    seen = client.Api().run("proj/live")
    assert seen.state == "running" and seen.summary == {"loss": "NaN", "step_loss": 1.5}
    run.tags = ("a", "b")
    with pytest.raises(ValueError):
        run.tags = "a"  # a string is not a list of tags
    client.finish()
    assert client.Api().run("proj/live").tags == ["a", "b"]


def test_public_run_update_saves_tags_summary_config_and_name(sdk_env) -> None:
    r0, _, _ = _three_runs()
    api = client.Api()
    run = api.run(f"alice/proj/{r0}")
    run.tags.append("reviewed")
    run.summary["note"] = "ok"  # a public run's summary is stored at once, as W&B's is
    assert client.Api().run(f"alice/proj/{r0}").summary["note"] == "ok"
    run.summary.update({"acc": 0.35})
    assert client.Api().run(f"alice/proj/{r0}").summary["acc"] == 0.35
    run.config["lr"] = 1.0
    run.name = "renamed"
    run.update()
    again = client.Api().run(f"alice/proj/{r0}")
    assert again.tags == ["base", "reviewed"] and again.summary["note"] == "ok"
    assert again.config["lr"] == 1.0 and again.name == "renamed" and again.state == "finished"
    assert _ids(api.runs("proj", filters={"display_name": "renamed"})) == [r0]
    with pytest.raises(ValueError):
        run.tags = ["x" * 65]
        run.update()


def test_a_store_made_before_the_run_columns_is_upgraded_in_place(sdk_env) -> None:
    """A registry.db at schema revision 0001_baseline, before runs had summary/tags and
    run_files existed: the embedded store upgrades it (migrations 0002_run_state, then
    0003_listing_stamp) on open."""
    with client.init(project="proj", id="old"):
        pass
    client.live_run._reset_for_tests()
    db = sdk_env["store"] / "registry.db"
    con = sqlite3.connect(db)
    con.execute("ALTER TABLE runs DROP COLUMN summary")
    con.execute("ALTER TABLE runs DROP COLUMN tags")
    con.execute("DROP TABLE run_files")
    con.execute("ALTER TABLE collections DROP COLUMN stamp")  # 0003_listing_stamp's
    con.execute("UPDATE alembic_version SET version_num = '0001_baseline'")
    con.commit()
    con.close()
    store = LocalStore(sdk_env["store"])
    try:
        assert store.get_run("alice", "proj", "old").summary == {}
        rec = store.update_run("alice", "proj", "old", summary={"acc": 1}, tags=["t"])
        assert rec.summary == {"acc": 1} and rec.tags == ("t",)
    finally:
        store.close()


# --------------------------------------------------------------------------- run files


def test_run_files_upload_list_and_download(sdk_env) -> None:
    out = write_tree(sdk_env["work"] / "out", {"model.bin": b"weights", "logs/a.txt": "hello"})
    with client.init(project="proj", id="f") as run:
        saved = run.upload_file(out / "model.bin", root=str(out))
        assert saved.name == "model.bin" and saved.size == 7
    public = client.Api().run("proj/f")
    public.upload_file("out/logs/a.txt", root="out")  # relative to the working directory, as W&B
    assert [f.name for f in public.files()] == ["logs/a.txt", "model.bin"]
    assert [f.name for f in public.files(names=["model.bin", "nope"])] == ["model.bin"]
    from client.hashing import hex_to_b64, md5_bytes

    assert public.file("model.bin").md5 == hex_to_b64(md5_bytes(b"weights"))
    with pytest.raises(NotFoundError):
        public.file("nope")
    dl = sdk_env["tmp"] / "dl"
    with public.file("logs/a.txt").download(root=str(dl)) as fh:
        assert fh.read() == "hello"
    with pytest.raises(ValueError, match="exists"):
        public.file("logs/a.txt").download(root=str(dl))
    (out / "logs/a.txt").write_text("second")
    public.upload_file("out/logs/a.txt", root="out")  # same name: replaced
    with public.file("logs/a.txt").download(root=str(dl), exist_ok=True) as fh:
        assert fh.read() == "hello"  # kept as it is
    with public.file("logs/a.txt").download(root=str(dl), replace=True) as fh:
        assert fh.read() == "second"
    with pytest.raises(ValueError):
        public.upload_file(out / "missing.bin")
    with pytest.raises(ValueError, match="climb"):  # stored as ../model.bin: outside the run's files
        public.upload_file(out / "model.bin", root=str(out / "logs"))
    public.delete()
    with pytest.raises(NotFoundError):
        client.Api().run("proj/f").files()[0]


# --------------------------------------------------------------------------- collections


def test_collection_save_renames_describes_retags_and_retypes(sdk_env) -> None:
    src = write_tree(sdk_env["tmp"] / "d", {"a.txt": b"1"})
    with client.init(project="proj") as run:
        run.log_artifact(src, name="raw", type="dataset", aliases=["best"])
        run.log_artifact(write_tree(sdk_env["tmp"] / "o", {"b.txt": b"2"}), name="other", type="dataset")
    api = client.Api()
    col = api.artifact_collection("dataset", "proj/raw")
    col.name, col.description, col.tags, col.type = "clean", "cleaned", ["gold", "reviewed"], "training-data"
    assert col.name == "clean" and col.type == "training-data"  # set, not yet saved
    col.save()
    again = api.artifact_collection("training-data", "proj/clean")
    assert (again.description, again.tags, again.aliases) == ("cleaned", ["gold", "reviewed"], ["best", "latest"])
    assert api.artifact("proj/clean:best").type == "training-data"
    assert not api.artifact_exists("proj/raw:latest")
    assert [c.name for c in api.artifact_collections("proj", "training-data")] == ["clean"]

    other = api.artifact_collection("dataset", "proj/other")
    other.name = "clean"
    with pytest.raises(ConflictError):
        other.save()
    other.name, other.type = "other", "wandb-history"
    with pytest.raises(ValueError, match="Failed to save artifact collection"):
        other.save()

    api.artifact("proj/clean:latest").link("shelf")
    shelf = api.artifact_collection("training-data", "proj/shelf")
    assert shelf.is_sequence() is False
    with pytest.raises(ValueError, match="sequence"):
        shelf.type = "model"
    shelf.description = "links"
    shelf.save()
    assert api.artifact_collection("training-data", "proj/shelf").description == "links"

    again.delete()
    assert not api.artifact_collection_exists("clean", "training-data")
    with pytest.raises(NotFoundError):
        api.artifact("proj/clean:v0")
    assert len(api.artifact_collection("training-data", "proj/shelf").versions()) == 0  # its link went too
    assert api.artifact("proj/other:latest").version == "v0"  # the rest is untouched


# --------------------------------------------------------------------------- over the HTTP store


@pytest.mark.timeout(120)
def test_runs_and_collections_over_http(registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same calls through a real server (SQLite + blob dir, PostgreSQL + S3)."""
    from client import live_run

    team = registry.new_team("lab")
    _, key = registry.new_user("alice", teams=(team,))
    monkeypatch.setenv("ARTIFACTFS_STORE", registry.server.url)
    monkeypatch.setenv("ARTIFACTFS_API_KEY", key)
    monkeypatch.setenv("ARTIFACTFS_CACHE_DIR", str(tmp_path / "cache"))
    live_run._reset_for_tests()
    try:
        src = write_tree(tmp_path / "src", {"a.txt": b"1"})
        with client.init(entity=team, project="proj", id="h1", tags=["exp"]) as run:
            run.log({"acc": 0.8, "loss": float("inf")})
            run.log_artifact(src, name="raw", type="dataset")
            run.upload_file(src / "a.txt", root=str(src))
        api = client.Api({"entity": team})
        assert [r.id for r in api.runs("proj", filters={"summary_metrics.acc": {"$gt": 0.5}, "tags": "exp"})] == ["h1"]
        public = api.run("proj/h1")
        assert public.summary == {"acc": 0.8, "loss": "Infinity"}
        public.tags = ["exp", "kept"]
        public.update()
        assert client.Api({"entity": team}).run("proj/h1").tags == ["exp", "kept"]
        with public.file("a.txt").download(root=str(tmp_path / "dl")) as fh:
            assert fh.read() == "1"
        col = api.artifact_collection("dataset", "proj/raw")
        col.name, col.tags = "clean", ["gold"]
        col.save()
        assert api.artifact_collection("dataset", "proj/clean").tags == ["gold"]
        col.delete()
        assert not api.artifact_collection_exists("clean", "dataset")
    finally:
        live_run._reset_for_tests()


def test_a_run_left_open_is_finished_at_exit_like_wandb(sdk_env) -> None:
    """wandb finishes the current run when the interpreter exits (crashed after an uncaught
    exception), so the last summary is stored even without ``wandb.finish()``."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    script = ("import client as wandb\nrun = wandb.init(project='proj', id='{id}')\n"
              "for i in range(50):\n    run.log({{'step_loss': 1.0 / (i + 1)}})\n{tail}")
    for run_id, tail, rc in (("ok", "", 0), ("boom", "1 / 0\n", 1)):
        proc = subprocess.run([sys.executable, "-c", script.format(id=run_id, tail=tail)], cwd=sdk_env["work"],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == rc, proc.stderr[-2000:]
    api = client.Api()
    ok, boom = api.run("proj/ok"), api.run("proj/boom")
    assert (ok.state, ok.summary) == ("finished", {"step_loss": 1.0 / 50})
    assert (boom.state, boom.summary) == ("crashed", {"step_loss": 1.0 / 50})


def test_wait_until_finished_returns_once_the_run_is_done_and_is_bounded(sdk_env) -> None:
    run = client.init(project="proj", id="w")
    public = client.Api().run("proj/w")
    with pytest.raises(TimeoutError, match="still running"):
        public.wait_until_finished(timeout=0)
    run.log({"acc": 1})
    client.finish()
    public.wait_until_finished(timeout=0)
    assert public.summary == {"acc": 1}  # re-read when it returns


def test_run_save_globs_like_wandb_and_public_save_is_update(sdk_env) -> None:
    work = sdk_env["work"]
    write_tree(work / "these/are/myfiles", {"a.txt": "1", "b.txt": "2"})
    write_tree(sdk_env["tmp"] / "abs/run123", {"c.txt": "3"})
    with client.init(project="proj", id="s") as run:
        assert run.save("these/are/myfiles/*") == ["these/are/myfiles/a.txt", "these/are/myfiles/b.txt"]
        assert client.save("these/are/myfiles/a.txt", base_path="these", policy="now") == ["are/myfiles/a.txt"]
        assert run.save(str(sdk_env["tmp"] / "abs/run123/*.txt")) == ["run123/c.txt"]  # one level kept
        assert run.save("these/are/myfiles/b.txt", base_path="these/are", policy="end") == []
        (work / "these/are/myfiles/a.txt").write_text("live")  # "live": uploaded again at finish
        with pytest.raises(ValueError):
            run.save("x", policy="sometimes")
    public = client.Api().run("proj/s")
    assert [f.name for f in public.files()] == ["are/myfiles/a.txt", "myfiles/b.txt", "run123/c.txt",
                                                "these/are/myfiles/a.txt", "these/are/myfiles/b.txt"]
    with public.file("these/are/myfiles/a.txt").download(root=str(sdk_env["tmp"] / "dl")) as fh:
        assert fh.read() == "live"
    with public.file("are/myfiles/a.txt").download(root=str(sdk_env["tmp"] / "dl")) as fh:
        assert fh.read() == "1"  # "now": not uploaded again
    public.tags = ["saved"]
    public.save()
    assert client.Api().run("proj/s").tags == ["saved"]
