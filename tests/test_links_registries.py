"""Links, portfolios and registries through the SDK (Artifact.link/unlink, Api.registries), on a
real embedded store: target path forms, source_* attributes, reading a link's content, filters."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

import client
from client.errors import ArtifactNotLoggedError, InvalidNameError, NotFoundError
from client.wandb_registries import parse_link_target

try:
    from _sdk_fixtures import sdk_env, tree_of  # noqa: F401
except ImportError:  # tests/ became a package
    from tests._sdk_fixtures import sdk_env, tree_of  # noqa: F401

pytestmark = pytest.mark.usefixtures("sdk_env")


def _log(name: str, type_: str, files: dict[str, str], metadata: dict | None = None,
         project: str = "proj") -> client.Artifact:
    art = client.Artifact(name, type_, metadata=metadata)
    for path, content in files.items():
        with art.new_file(path) as fh:
            fh.write(content)
    with client.init(project=project, reinit=True) as run:
        run.log_artifact(art)
    return art


def test_parse_link_target_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_link_target("port", "alice", "proj") == ("alice", "proj", "port")
    assert parse_link_target("other/port", "alice", "proj") == ("alice", "other", "port")
    assert parse_link_target("bob/other/port", "alice", "proj") == ("bob", "other", "port")
    assert parse_link_target("wandb-registry-model/resnet", "alice", "proj") == ("alice", "wandb-registry-model",
                                                                                  "resnet")
    monkeypatch.setenv("ARTIFACTFS_ORGANIZATION", "acme")
    assert parse_link_target("wandb-registry-model/resnet", "alice", "proj") == ("acme", "wandb-registry-model",
                                                                                  "resnet")
    assert parse_link_target("acme2/wandb-registry-model/resnet", "alice", "p")[0] == "acme2"
    for bad in ("", "a/b/c/d", "port:v0", "bad name"):
        with pytest.raises(InvalidNameError):
            parse_link_target(bad, "alice", "proj")


def test_link_resolve_read_and_unlink(sdk_env: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARTIFACTFS_ORGANIZATION", "acme")
    draft = client.Artifact("net", "model")
    with pytest.raises(ArtifactNotLoggedError):
        draft.link("wandb-registry-model/resnet")
    src = _log("net", "model", {"w.pt": "weights"})
    assert not src.is_link
    link = src.link("wandb-registry-model/resnet", aliases=["production"])
    assert (link.entity, link.project, link.name) == ("acme", "wandb-registry-model", "resnet:v0")
    assert set(link.aliases) == {"latest", "production"} and link.is_link
    got = client.Api().artifact("acme/wandb-registry-model/resnet:production")
    assert got.id == link.id and got.qualified_name == "acme/wandb-registry-model/resnet:v0"
    assert client.Api().artifact("wandb-registry-model/resnet:production").id == link.id  # org by default
    assert (got.source_entity, got.source_project, got.source_name, got.source_version) == (
        "alice", "proj", "net:v0", "v0")
    assert got.source_qualified_name == "alice/proj/net:v0" and got.source_collection.name == "net"
    assert got.collection.name == "resnet" and not got.collection.is_sequence() and src.collection.is_sequence()
    assert got.digest == src.digest and got.type == "model"
    out = Path(got.download(sdk_env["tmp"] / "dl"))  # content comes from the source entity's blobs
    assert tree_of(out) == {"w.pt": b"weights"}
    got.verify(out)
    assert got.get_entry("w.pt").download(sdk_env["tmp"] / "one").endswith("w.pt")
    assert got.logged_by() is not None and got.logged_by().id == src.logged_by().id  # type: ignore[union-attr]
    again = got.link("wandb-registry-model/resnet", aliases=["canary"])  # a link of a link links the source
    assert again.id == link.id and "canary" in again.aliases
    portfolio = src.link("best-nets")  # {portfolio}: same entity and project as the source
    assert portfolio.qualified_name == "alice/proj/best-nets:v0"
    assert src.link("other/best").qualified_name == "alice/other/best:v0"
    with pytest.raises(ValueError, match="not linked"):
        src.unlink()
    got.unlink()
    assert got.state == "DELETED"
    with pytest.raises(NotFoundError):
        client.Api().artifact("acme/wandb-registry-model/resnet:production")
    assert client.Api().artifact("proj/net:v0").state == "COMMITTED"
    portfolio.delete()  # deleting a link deletes only the link, aliases or not
    assert client.Api().artifact("proj/net:v0").state == "COMMITTED"


def test_registries_collections_and_versions_filters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARTIFACTFS_ORGANIZATION", "acme")
    a = _log("net-a", "model", {"w": "a"}, metadata={"acc": 0.91})
    b = _log("net-b", "model", {"w": "b"}, metadata={"acc": 0.75})
    d = _log("images", "dataset", {"x": "x"})
    a.link("wandb-registry-model/resnet", aliases=["best"])
    b.link("wandb-registry-model/resnet")
    b.link("wandb-registry-model/vit", aliases=["best"])
    d.link("wandb-registry-dataset/imagenet")
    vit = client.Api().artifact("acme/wandb-registry-model/vit:v0")
    vit.tags = ["prod"]
    vit.save()
    _log("unrelated", "model", {"w": "z"}, project="not-a-registry")  # a plain project is no registry

    api = client.Api()
    regs = api.registries()
    assert sorted(r.name for r in regs) == ["dataset", "model"]
    assert regs.organization == "acme" and all(r.organization == "acme" for r in regs)
    model = api.registries(filter={"name": {"$regex": "mod"}})
    assert [r.full_name for r in model] == ["wandb-registry-model"]
    assert model[0].created_at <= model[0].updated_at
    assert [r.name for r in api.registries(filter={"created_at": {"$gt": dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)}})] == ["dataset", "model"]
    assert list(api.registries(organization="nobody")) == []

    assert sorted(c.name for c in model.collections()) == ["resnet", "vit"]
    assert [c.name for c in api.registries().collections(filter={"name": "vit"})] == ["vit"]
    assert [c.name for c in model[0].collections(filter={"name": {"$regex": "^res"}})] == ["resnet"]
    best = api.registries().versions(filter={"alias": "best"})
    assert sorted(v.qualified_name for v in best) == ["acme/wandb-registry-model/resnet:v0",
                                                      "acme/wandb-registry-model/vit:v0"]
    either = model.versions(filter={"$or": [{"tag": "prod"}, {"alias": "best"}]})
    assert sorted(v.source_name for v in either) == ["net-a:v0", "net-b:v0"]
    accurate = api.registries().collections(filter={"name": {"$regex": "resnet"}}).versions(
        filter={"metadata.acc": {"$gte": 0.9}})
    assert [v.source_name for v in accurate] == ["net-a:v0"]
    assert [v.name for v in model[0].versions(filter={"tag": "prod"})] == ["vit:v0"]
    with pytest.raises(ValueError):
        api.registries(filter={"name": {"$nope": 1}})
