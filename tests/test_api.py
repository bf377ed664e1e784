"""Api: the name rules of the W&B reference and every query method, on a real embedded store."""

from __future__ import annotations

from pathlib import Path

import pytest

import client
from client.errors import NotFoundError

try:
    from _sdk_fixtures import sdk_env  # noqa: F401
except ImportError:  # tests/ became a package
    from tests._sdk_fixtures import sdk_env  # noqa: F401

pytestmark = pytest.mark.usefixtures("sdk_env")


def _log(entity: str, project: str, name: str, type_: str, content: str, aliases: list[str] | None = None,
         tags: list[str] | None = None) -> client.Artifact:
    art = client.Artifact(name, type_)
    with art.new_file("f.txt") as fh:
        fh.write(content)
    with client.init(entity=entity, project=project, reinit=True) as run:
        run.log_artifact(art, aliases=aliases, tags=tags)
    return art


@pytest.fixture
def populated(sdk_env: dict[str, Path]) -> dict[str, client.Artifact]:
    return {
        "v0": _log("alice", "proj", "ds", "dataset", "0", tags=["raw"]),
        "v1": _log("alice", "proj", "ds", "dataset", "1", aliases=["best"], tags=["raw", "clean"]),
        "unc": _log("alice", "uncategorized", "loose", "dataset", "u"),
        "model": _log("alice", "proj", "net", "model", "m"),
        "bob": _log("bob", "team", "ds", "dataset", "b"),
    }


def test_artifact_name_forms(populated: dict[str, client.Artifact], monkeypatch: pytest.MonkeyPatch) -> None:
    api = client.Api(overrides={"project": "proj"})
    assert api.artifact("ds:v0").id == populated["v0"].id
    assert api.artifact("ds:best").id == populated["v1"].id
    assert api.artifact("ds").id == populated["v1"].id  # no version: latest
    assert api.artifact("proj/ds:latest").id == populated["v1"].id
    assert api.artifact("alice/proj/ds:v1").id == populated["v1"].id
    assert api.artifact("bob/team/ds:v0").id == populated["bob"].id
    monkeypatch.delenv("ARTIFACTFS_PROJECT")
    assert client.Api().artifact("loose:v0").id == populated["unc"].id  # project defaults to uncategorized
    assert client.Api(overrides={"entity": "bob", "project": "team"}).artifact("ds:latest").id == populated["bob"].id
    for bad in ("", None):
        with pytest.raises(ValueError):
            api.artifact(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        api.artifact("a/b/c/d:v0")
    with pytest.raises(ValueError):
        api.artifact("ds:v1", type="model")
    assert api.artifact("ds:v1", type="dataset").type == "dataset"
    with pytest.raises(NotFoundError):
        api.artifact("ds:v9")


def test_artifact_exists(populated: dict[str, client.Artifact]) -> None:
    api = client.Api()
    assert api.artifact_exists("proj/ds:v1") and api.artifact_exists("proj/ds:best", type="dataset")
    assert not api.artifact_exists("proj/ds:v7")
    assert not api.artifact_exists("proj/ds:v1", type="model")
    assert not api.artifact_exists("nothing/here:v0")


def test_artifact_collection_and_exists(populated: dict[str, client.Artifact]) -> None:
    api = client.Api()
    col = api.artifact_collection("dataset", "alice/proj/ds")
    assert (col.name, col.type, col.entity, col.project, col.is_sequence()) == ("ds", "dataset", "alice", "proj", True)
    assert col.aliases == ["best", "latest"] and col.description is None and col.tags == []
    assert [a.version for a in col.versions()] == ["v1", "v0"]
    with pytest.raises(NotFoundError):
        api.artifact_collection("model", "proj/ds")
    assert api.artifact_collection_exists("proj/ds", "dataset")
    assert not api.artifact_collection_exists("proj/ds", "model")
    assert not api.artifact_collection_exists("proj/none", "dataset")
    with pytest.raises(ValueError):
        api.artifact_collection("dataset", "proj/ds:v0")


def test_artifact_collections_types_and_type(populated: dict[str, client.Artifact]) -> None:
    api = client.Api()
    cols = api.artifact_collections("proj", "dataset", per_page=1)
    assert [c.name for c in cols] == ["ds"] and len(cols) == 1
    assert [c.name for c in api.artifact_collections("bob/team", "dataset")] == ["ds"]
    assert sorted(t.name for t in api.artifact_types("proj")) == ["dataset", "model"]
    t = api.artifact_type("model", project="alice/proj")
    assert t.name == "model" and [c.name for c in t.collections()] == ["net"]
    assert t.collection("net").type == "model"
    with pytest.raises(NotFoundError):
        api.artifact_type("checkpoint", "proj")


def test_artifacts_with_tags_pages_and_deprecated_alias(populated: dict[str, client.Artifact]) -> None:
    api = client.Api()
    arts = api.artifacts("dataset", "proj/ds", per_page=1)
    assert [a.version for a in arts] == ["v1", "v0"] and len(list(arts.pages())) == 2 and arts[1].version == "v0"
    assert [a.version for a in api.artifacts("dataset", "proj/ds", tags=["raw"])] == ["v1", "v0"]
    assert [a.version for a in api.artifacts("dataset", "proj/ds", tags=["raw", "clean"])] == ["v1"]
    with pytest.warns(DeprecationWarning):
        assert [a.version for a in api.artifact_versions("dataset", "proj/ds")] == ["v1", "v0"]


def test_projects_and_runs(populated: dict[str, client.Artifact]) -> None:
    api = client.Api()
    assert sorted(p.name for p in api.projects()) == ["proj", "uncategorized"]
    assert [p.name for p in api.projects("bob")] == ["team"]
    assert list(api.projects("nobody")) == []
    proj = api.project("proj")
    assert proj.path == ["alice", "proj"] and sorted(t.name for t in proj.artifacts_types()) == ["dataset", "model"]
    with pytest.raises(NotFoundError):
        api.project("missing")
    runs = api.runs("alice/proj")
    assert len(runs) == 3 and all(r.state == "finished" for r in runs)
    newest_first = api.runs("proj", order="-created_at")
    assert [r.id for r in newest_first] == [r.id for r in reversed(list(runs))]
    producer = populated["v1"].logged_by()
    assert producer is not None
    assert api.run(f"alice/proj/{producer.id}").id == producer.id
    assert api.run(f"proj/runs/{producer.id}").id == producer.id
    assert [r.job_type for r in api.runs("alice/proj", filters={"jobType": "train"})] == []
    with client.init(project="proj", job_type="train", config={"lr": 0.5}, id="trainer", reinit=True):
        pass
    assert [r.id for r in api.runs("alice/proj", filters={"jobType": "train"})] == ["trainer"]
    assert [r.id for r in api.runs("proj", filters={"config.lr": {"$gt": 0.1}, "state": "finished"})] == ["trainer"]
    assert len(api.runs("proj", filters={"$or": [{"jobType": "train"}, {"state": "finished"}]})) == 4
    with pytest.raises(ValueError):
        api.runs("proj", filters={"state": {"$bogus": 1}})
    with pytest.raises(NotFoundError):
        api.run("alice/proj/nope")
    with pytest.raises(ValueError):
        api.run("")


def test_api_store_override(populated: dict[str, client.Artifact], sdk_env: dict[str, Path]) -> None:
    empty = client.Api(overrides={"base_url": str(sdk_env["tmp"] / "elsewhere")})
    assert not empty.artifact_exists("alice/proj/ds:v0")
    assert client.Api(overrides={"store": str(sdk_env["store"])}).artifact_exists("alice/proj/ds:v0")


def test_create_project_create_run_and_run_delete(populated: dict[str, client.Artifact]) -> None:
    api = client.Api()
    assert api.create_project("fresh", "carol") is None
    assert [p.name for p in api.projects("carol")] == ["fresh"]
    api.create_project("fresh", "carol")  # idempotent
    made = api.create_run(project="fresh", entity="carol")
    assert made.entity == "carol" and made.project == "fresh" and made.state == "running" and len(made.id) == 8
    named = api.create_run(run_id="chosen")  # defaults: alice/proj
    assert named.path == "alice/proj/chosen" and api.run("proj/chosen").id == "chosen"
    art = client.Artifact("from-api-run", "dataset")
    with art.new_file("f") as fh:
        fh.write("f")
    named.log_artifact(art, aliases=["x"])
    named.use_artifact(populated["v0"])
    assert [a.name for a in named.logged_artifacts()] == ["from-api-run:v0"]
    assert [a.name for a in named.used_artifacts()] == ["ds:v0"]
    named.delete()  # artifacts stay, without a producer
    with pytest.raises(NotFoundError):
        api.run("proj/chosen")
    kept = api.artifact("proj/from-api-run:x")
    assert kept.logged_by() is None and populated["v0"].used_by() == []
    producer = populated["model"].logged_by()
    assert producer is not None
    producer.delete(delete_artifacts=True)  # its outputs go too, aliases or not
    assert not api.artifact_exists("proj/net:v0")
    assert api.artifact_exists("proj/ds:v0")


def test_runs_filter_operators_and_order(sdk_env: dict[str, Path]) -> None:
    specs = [("r1", "train", {"lr": 0.1, "experiment": {"category": "testing"}, "name": "foo"}),
             ("r2", "train", {"lr": 0.3, "name": "bar"}),
             ("r3", "eval", {"lr": 0.2, "name": "baz"}),
             ("r4", None, {})]
    for run_id, job, config in specs:
        with client.init(project="runs", id=run_id, job_type=job, config=config, name=f"eager-{run_id}",
                         reinit=True):
            pass
    api = client.Api()

    def ids(filters: dict | None = None, order: str = "+created_at") -> list[str]:
        return [r.id for r in api.runs("alice/runs", filters=filters, order=order)]

    assert ids() == ["r1", "r2", "r3", "r4"]
    assert ids(order="-created_at") == ["r4", "r3", "r2", "r1"]
    assert ids(order="+config.lr") == ["r4", "r1", "r3", "r2"]  # missing sorts first, as in MongoDB
    assert ids({"config.name": "foo"}) == ["r1"]
    assert ids({"$or": [{"config.name": "foo"}, {"config.name": "bar"}]}) == ["r1", "r2"]
    assert ids({"$and": [{"jobType": "train"}, {"config.lr": {"$gt": 0.2}}]}) == ["r2"]
    assert ids({"$nor": [{"jobType": "train"}, {"jobType": "eval"}]}) == ["r4"]
    assert ids({"config.lr": {"$eq": 0.2}}) == ["r3"]
    assert ids({"jobType": {"$ne": "train"}}) == ["r3", "r4"]
    assert ids({"config.lr": {"$gte": 0.2}}) == ["r2", "r3"]
    assert ids({"config.lr": {"$lt": 0.2}}) == ["r1"]
    assert ids({"config.lr": {"$lte": 0.2}}) == ["r1", "r3"]
    assert ids({"name": {"$in": ["r2", "r4"]}}) == ["r2", "r4"]
    assert ids({"name": {"$nin": ["r2", "r4"]}}) == ["r1", "r3"]
    assert ids({"config.lr": {"$exists": False}}) == ["r4"]
    assert ids({"config.name": {"$regex": "b.*"}}) == ["r2", "r3"]
    assert ids({"display_name": {"$regex": "^eager-r[12]"}}) == ["r1", "r2"]
    assert ids({"config.experiment.category": "testing"}) == ["r1"]
    assert ids({"createdAt": {"$gt": "2000-01-01T00:00:00Z"}, "state": "finished"}) == ["r1", "r2", "r3", "r4"]
    assert len(list(api.runs("alice/runs", per_page=1).pages())) == 4
