"""init()/Run, lineage (logged_by/used_by), and concurrent logging from many processes."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import pytest

import client
from client.errors import ArtifactFSError, NotFoundError

try:
    from _sdk_fixtures import sdk_env, write_tree  # noqa: F401
except ImportError:  # tests/ became a package
    from tests._sdk_fixtures import sdk_env, write_tree  # noqa: F401

pytestmark = pytest.mark.usefixtures("sdk_env")


def test_init_defaults_and_context_manager() -> None:
    with client.init(job_type="train", name="first", config={"lr": 0.1}, id="run1") as run:
        assert (run.entity, run.project, run.id, run.name, run.job_type) == ("alice", "proj", "run1", "first", "train")
        assert run.config == {"lr": 0.1} and run.path == "alice/proj/run1"
        assert client.current_run() is run and run.state == "running"
    assert client.current_run() is None and run.state == "finished"
    with pytest.raises(RuntimeError):
        with client.init(entity="bob", project="other") as crashing:
            raise RuntimeError("boom")
    assert client.Api().run("bob/other/" + crashing.id).state == "crashed"
    with pytest.raises(ArtifactFSError):
        crashing.log_artifact(client.Artifact("x", "dataset"))


def test_init_reinit_semantics() -> None:
    a = client.init()
    assert client.init() is a  # W&B script default: return the active run
    b = client.init(reinit=True)
    assert b is not a and a.state == "finished" and client.current_run() is b
    c = client.init(reinit="create_new")
    assert b.state == "running" and client.current_run() is c
    b.finish()
    c.finish()


def test_log_artifact_from_paths(sdk_env: dict[str, Path]) -> None:
    d = write_tree(sdk_env["tmp"] / "folder", {"x": "1", "y/z": "2"})
    f = write_tree(sdk_env["tmp"] / "single", {"w.txt": "3"}) / "w.txt"
    with client.init(id="r1") as run:
        a = run.log_artifact(d)
        b = run.log_artifact(f, name="weights", type="model", aliases=["best"], tags=["fp16"])
        with pytest.raises(FileNotFoundError):
            run.log_artifact(sdk_env["tmp"] / "absent")
    assert (a.name, a.type, a.file_count) == ("run-r1-folder:v0", "unspecified", 2)
    assert (b.name, b.type, set(b.aliases), b.tags) == ("weights:v0", "model", {"latest", "best"}, ["fp16"])


def test_lineage_logged_and_used(sdk_env: dict[str, Path]) -> None:
    src = write_tree(sdk_env["tmp"] / "data", {"a": "1"})
    with client.init(job_type="prep", id="producer") as producer:
        art = client.Artifact("ds", "dataset")
        art.add_dir(src)
        producer.log_artifact(art)
    with client.init(job_type="train", id="consumer") as consumer:
        used = consumer.use_artifact("ds:latest", type="dataset", use_as="training-data")
        assert used.id == art.id and used.use_as == "training-data"
        with pytest.raises(ValueError):
            consumer.use_artifact("ds", type="model")
        with pytest.raises(NotFoundError):
            consumer.use_artifact("proj/nothing:latest")
        model = client.Artifact("model", "model")
        with model.new_file("w.bin", mode="xb") as fh:
            fh.write(b"w")
        consumer.log_artifact(model)
    assert art.logged_by().id == "producer"  # type: ignore[union-attr]
    assert [r.id for r in art.used_by()] == ["consumer"]
    assert [a.name for a in consumer.logged_artifacts()] == ["model:v0"]
    assert [a.name for a in consumer.used_artifacts()] == ["ds:v0"]
    public = client.Api().run("alice/proj/consumer")
    assert [a.name for a in public.used_artifacts()] == ["ds:v0"]
    assert [a.name for a in public.logged_artifacts(per_page=1)] == ["model:v0"]
    assert client.Api().run("alice/proj/producer").job_type == "prep"


def test_use_artifact_with_a_draft_logs_it_without_claiming_it(sdk_env: dict[str, Path]) -> None:
    with client.init(id="user") as run:
        draft = client.Artifact("external", "dataset")
        with draft.new_file("f.txt") as fh:
            fh.write("x")
        used = run.use_artifact(draft, aliases=["pinned"])
        assert used is draft and not draft.is_draft() and "pinned" in draft.aliases
        again = run.use_artifact(draft)  # a logged Artifact object
        assert again.id == draft.id
    assert draft.logged_by() is None
    assert [r.id for r in draft.used_by()] == ["user"]


def test_public_run_log_and_use(sdk_env: dict[str, Path]) -> None:
    with client.init(id="maker") as run:
        pass
    public = client.Api().run("proj/maker")
    art = client.Artifact("late", "dataset")
    with art.new_file("f") as fh:
        fh.write("late")
    public.log_artifact(art, aliases=["added-later"])
    assert art.logged_by().id == "maker"  # type: ignore[union-attr]
    public.use_artifact(client.Api().artifact("proj/late:v0"), use_as="self")
    assert [a.name for a in public.used_artifacts()] == ["late:v0"]
    assert run.state == "finished"


def test_module_level_helpers_need_init(sdk_env: dict[str, Path]) -> None:
    art = client.Artifact("mod", "dataset")
    with art.new_file("f") as fh:
        fh.write("m")
    with pytest.raises(ArtifactFSError, match="init"):
        client.log_artifact(art)
    with pytest.raises(ArtifactFSError, match="init"):
        client.use_artifact("mod:latest")
    run = client.init(id="helper")
    client.log_artifact(art, aliases=["a1"])
    assert client.use_artifact("mod:a1").id == art.id
    run.finish()
    assert [a.name for a in run.used_artifacts()] == ["mod:v0"]


# -- concurrency ------------------------------------------------------------------------------------------------
def _log_one(store: str, cache: str, i: int, barrier: "mp.synchronize.Barrier") -> str:  # type: ignore[name-defined]
    os.environ.update(ARTIFACTFS_STORE=store, ARTIFACTFS_CACHE_DIR=cache, ARTIFACTFS_ENTITY="alice")
    import client as sdk

    art = sdk.Artifact("shared", "dataset")
    with art.new_file("payload.txt") as fh:
        fh.write(f"writer {i}\n" * (i + 1))
    barrier.wait(timeout=60)
    with sdk.init(project="proj", id=f"w{i}") as run:
        run.log_artifact(art)
    return art.version


def test_eight_processes_log_gapless_versions(sdk_env: dict[str, Path]) -> None:
    n = 8
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(n)
        with ctx.Pool(n) as pool:
            versions = pool.starmap(_log_one, [(str(sdk_env["store"]), str(sdk_env["cache"]), i, barrier)
                                               for i in range(n)])
    assert sorted(versions, key=lambda v: int(v[1:])) == [f"v{i}" for i in range(n)]
    api = client.Api()
    col = api.artifact_collection("dataset", "proj/shared")
    assert [a.version for a in col.versions()] == [f"v{i}" for i in reversed(range(n))]
    latest = api.artifact("proj/shared:latest")
    assert latest.version == f"v{n - 1}"
    assert sorted(r.id for a in col.versions() for r in [a.logged_by()] if r) == sorted(f"w{i}" for i in range(n))
