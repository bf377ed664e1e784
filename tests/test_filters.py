"""The MongoDB-style filter engine: every operator, nesting, list membership, ordering, bad input."""

from __future__ import annotations

import re
from datetime import datetime, timezone

import pytest

from client.errors import InvalidNameError
from client.filters import FilterError, filter_docs, matches, parse_order, resolve, sort_key, validate_filter

RUN = {
    "name": "a1b2cdef",
    "displayName": "eager-fox-1",
    "state": "finished",
    "tags": ["baseline", "prod"],
    "createdAt": "2023-01-02T12:00:00Z",
    "config": {"experiment_name": "foo", "lr": 0.01, "experiment": {"category": "testing"},
               "layers": [{"units": 64}, {"units": 128}], "use_amp": True, "seed": 1},
    "summary_metrics": {"acc": 0.91, "loss": 0.5, "model1": {"loss": 0.5}},
    "duration": 120,
    "group": None,
}

VERSION = {"alias": ["latest", "best"], "tag": [], "metadata": {"lr": 0.1, "split": "train"},
           "created_at": datetime(2024, 5, 1, 8, 30, tzinfo=timezone.utc)}


# --------------------------------------------------------------------------- equality and paths


def test_empty_and_none_filters_match_everything() -> None:
    assert matches(RUN, {}) and matches(RUN, None)


def test_implicit_equality_and_dotted_paths() -> None:
    assert matches(RUN, {"config.experiment_name": "foo"})
    assert not matches(RUN, {"config.experiment_name": "bar"})
    assert matches(RUN, {"config.experiment.category": "testing"})
    assert matches(RUN, {"summary_metrics.model1.loss": 0.5})
    assert matches(RUN, {"state": "finished", "duration": 120})  # fields AND together
    assert not matches(RUN, {"state": "finished", "duration": 121})
    assert matches(RUN, {"config.experiment": {"category": "testing"}})  # whole sub-document
    assert not matches(RUN, {"config.experiment": {"category": "testing", "x": 1}})
    assert not matches(RUN, {"config.nope.deeper": 1})


def test_paths_walk_lists_of_documents_and_indexes() -> None:
    assert resolve(RUN, "config.layers.units") == [64, 128]
    assert matches(RUN, {"config.layers.units": 128})
    assert matches(RUN, {"config.layers.1.units": 128})
    assert not matches(RUN, {"config.layers.0.units": 128})
    assert resolve(RUN, "missing.path") == []


def test_numbers_compare_across_int_and_float_but_not_bool() -> None:
    assert matches(RUN, {"duration": 120.0})
    assert matches(RUN, {"config.use_amp": True})
    assert not matches(RUN, {"config.use_amp": 1})
    assert not matches(RUN, {"config.seed": True})
    assert matches(RUN, {"config.seed": 1})


def test_none_matches_null_and_missing() -> None:
    assert matches(RUN, {"group": None})
    assert matches(RUN, {"not_there": None})
    assert not matches(RUN, {"state": None})


def test_list_fields_have_membership_semantics() -> None:
    assert matches(RUN, {"tags": "prod"})
    assert not matches(RUN, {"tags": "dev"})
    assert matches(RUN, {"tags": ["baseline", "prod"]})  # exact list
    assert not matches(RUN, {"tags": ["prod", "baseline"]})  # order matters for whole-list equality
    assert matches(VERSION, {"alias": "best"})
    assert not matches(VERSION, {"tag": "prod"})
    assert matches(VERSION, {"tag": []})


# --------------------------------------------------------------------------- operators


def test_eq_ne() -> None:
    assert matches(RUN, {"state": {"$eq": "finished"}})
    assert not matches(RUN, {"state": {"$ne": "finished"}})
    assert matches(RUN, {"state": {"$ne": "running"}})
    assert matches(RUN, {"missing": {"$ne": "x"}})  # a missing field is "not equal"
    assert not matches(RUN, {"tags": {"$ne": "prod"}})  # no element may equal it
    assert matches(RUN, {"tags": {"$eq": "prod"}})


@pytest.mark.parametrize("op,value,expected", [
    ("$gt", 0.9, True), ("$gt", 0.91, False), ("$gte", 0.91, True), ("$gte", 0.92, False),
    ("$lt", 1, True), ("$lt", 0.91, False), ("$lte", 0.91, True), ("$lte", 0.5, False),
])
def test_ordering_operators(op: str, value: float, expected: bool) -> None:
    assert matches(RUN, {"summary_metrics.acc": {op: value}}) is expected


def test_ordering_never_crosses_types_and_missing_never_matches() -> None:
    assert not matches(RUN, {"state": {"$gt": 5}})
    assert not matches(RUN, {"duration": {"$gt": "100"}})
    assert not matches(RUN, {"missing": {"$lt": 10}})
    assert not matches(RUN, {"config.use_amp": {"$gt": 0}})
    assert matches(RUN, {"displayName": {"$gt": "eager", "$lt": "f"}})  # string ranges, ANDed


def test_ordering_on_list_elements_and_range() -> None:
    assert matches(RUN, {"config.layers.units": {"$gt": 100}})
    assert matches(RUN, {"config.layers.units": {"$gte": 64, "$lte": 64}})
    assert not matches(RUN, {"config.layers.units": {"$gt": 200}})


def test_datetimes_and_iso_strings_compare() -> None:
    assert matches(RUN, {"createdAt": {"$gt": "2023-01-01T00:00:00Z"}})
    assert matches(RUN, {"createdAt": {"$lt": datetime(2023, 1, 3, tzinfo=timezone.utc)}})
    assert matches(VERSION, {"created_at": {"$gte": "2024-05-01T08:30:00+00:00"}})
    assert matches(VERSION, {"created_at": {"$lt": "2024-05-02"}})
    assert not matches(VERSION, {"created_at": {"$lt": "2024-04-30T00:00:00Z"}})
    assert matches(VERSION, {"created_at": datetime(2024, 5, 1, 8, 30)})  # naive = UTC
    assert not matches(VERSION, {"created_at": {"$gt": "not a date"}})


def test_in_nin() -> None:
    assert matches(RUN, {"state": {"$in": ["running", "finished"]}})
    assert not matches(RUN, {"state": {"$in": ["running", "crashed"]}})
    assert matches(RUN, {"tags": {"$in": ["dev", "prod"]}})
    assert not matches(RUN, {"tags": {"$nin": ["dev", "prod"]}})
    assert matches(RUN, {"tags": {"$nin": ["dev", "staging"]}})
    assert matches(RUN, {"missing": {"$nin": ["x"]}})
    assert not matches(RUN, {"missing": {"$in": ["x"]}})
    assert matches(RUN, {"missing": {"$in": [None]}})
    assert matches(RUN, {"displayName": {"$in": [re.compile("^eager")]}})


def test_exists() -> None:
    assert matches(RUN, {"config.lr": {"$exists": True}})
    assert not matches(RUN, {"config.lr": {"$exists": False}})
    assert matches(RUN, {"config.momentum": {"$exists": False}})
    assert matches(RUN, {"group": {"$exists": True}})  # null is present


def test_regex() -> None:
    assert matches(RUN, {"config.experiment_name": {"$regex": "f.*"}})
    assert matches(RUN, {"displayName": {"$regex": "^eager"}})
    assert not matches(RUN, {"displayName": {"$regex": "^fox"}})
    assert matches(RUN, {"displayName": {"$regex": "FOX", "$options": "i"}})
    assert not matches(RUN, {"displayName": {"$regex": "FOX"}})
    assert matches(RUN, {"tags": {"$regex": "^pro"}})  # any element
    assert not matches(RUN, {"duration": {"$regex": "12"}})  # not a string
    assert matches(RUN, {"displayName": re.compile("fox")})  # a compiled pattern as value


def test_not_all_size() -> None:
    assert matches(RUN, {"summary_metrics.acc": {"$not": {"$lt": 0.5}}})
    assert not matches(RUN, {"summary_metrics.acc": {"$not": {"$gt": 0.5}}})
    assert matches(RUN, {"displayName": {"$not": "^zzz"}})
    assert matches(RUN, {"tags": {"$all": ["prod", "baseline"]}})
    assert not matches(RUN, {"tags": {"$all": ["prod", "dev"]}})
    assert matches(RUN, {"tags": {"$size": 2}})
    assert not matches(RUN, {"tags": {"$size": 1}})


# --------------------------------------------------------------------------- logical


def test_and_or_nor() -> None:
    assert matches(RUN, {"$or": [{"config.experiment_name": "foo"}, {"config.experiment_name": "bar"}]})
    assert not matches(RUN, {"$or": [{"config.experiment_name": "x"}, {"config.experiment_name": "y"}]})
    assert matches(RUN, {"$and": [{"state": "finished"}, {"summary_metrics.acc": {"$gt": 0.9}}]})
    assert not matches(RUN, {"$and": [{"state": "finished"}, {"summary_metrics.acc": {"$gt": 0.95}}]})
    assert matches(RUN, {"$nor": [{"state": "crashed"}, {"tags": "dev"}]})
    assert not matches(RUN, {"$nor": [{"state": "crashed"}, {"tags": "prod"}]})


def test_deep_nesting_and_mixing_with_fields() -> None:
    f = {
        "state": "finished",
        "$or": [
            {"$and": [{"tags": "prod"}, {"$nor": [{"config.lr": {"$gt": 0.1}}]}]},
            {"summary_metrics.loss": {"$lt": 0.1}},
        ],
    }
    assert matches(RUN, f)
    f["$or"][0]["$and"][1]["$nor"][0]["config.lr"]["$gt"] = 0.001
    assert not matches(RUN, f)


def test_registry_style_filters_from_the_seed() -> None:
    regs = [{"name": "wandb-registry-model", "description": "models"},
            {"name": "wandb-registry-dataset", "description": "data"}]
    assert [r["name"] for r in filter_docs(regs, {"name": {"$regex": "model"}})] == ["wandb-registry-model"]
    versions = [{"tag": ["prod"], "alias": []}, {"tag": [], "alias": ["best"]}, {"tag": [], "alias": []}]
    got = filter_docs(versions, {"$or": [{"tag": "prod"}, {"alias": "best"}]})
    assert got == versions[:2]
    assert filter_docs(versions, None) == versions


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [
    {"state": {"$foo": 1}},
    {"$where": "1"},
    {"$and": {"state": "x"}},
    {"$or": []},
    {"$or": ["state"]},
    {"state": {"$in": "finished"}},
    {"state": {"$nin": 3}},
    {"state": {"$exists": "yes"}},
    {"state": {"$regex": "("}},
    {"state": {"$regex": "a", "$options": "q"}},
    {"state": {"$options": "i"}},
    {"state": {"$regex": 5}},
    {"state": {"$eq": 1, "plain": 2}},
    {"state": {"$and": [{}]}},
    {"state": {"$size": -1}},
    {"state": {"$not": 5}},
    {"": 1},
])
def test_invalid_filters_raise_clear_value_errors(bad: dict) -> None:
    with pytest.raises(InvalidNameError) as info:
        validate_filter(bad)
    assert isinstance(info.value, ValueError) and isinstance(info.value, FilterError)
    assert str(info.value)


def test_unknown_operator_message_lists_supported_ones() -> None:
    with pytest.raises(FilterError, match=r"\$foo.*supported:.*\$regex"):
        matches(RUN, {"state": {"$foo": 1}})
    with pytest.raises(FilterError, match="must be a dict"):
        matches(RUN, ["state"])  # type: ignore[arg-type]


def test_validate_catches_errors_in_branches_no_document_reaches() -> None:
    f = {"$or": [{"state": "finished"}, {"x": {"$bogus": 1}}]}
    assert matches(RUN, f)  # short-circuits past the bad branch ...
    with pytest.raises(FilterError):
        filter_docs([RUN], f)  # ... but filter_docs validates first


# --------------------------------------------------------------------------- ordering


def test_parse_order() -> None:
    assert parse_order("+created_at") == [("created_at", False)]
    assert parse_order("-summary_metrics.acc") == [("summary_metrics.acc", True)]
    assert parse_order("created_at") == [("created_at", True)]  # W&B: descending by default
    assert parse_order("-a, +b") == [("a", True), ("b", False)]
    for bad in ("", "+", "-$gt", "a..b", None):
        with pytest.raises(FilterError):
            parse_order(bad)  # type: ignore[arg-type]


def test_sort_key_ascending_descending_missing_and_mixed() -> None:
    docs = [
        {"id": "a", "summary_metrics": {"acc": 0.5}, "created_at": "2024-01-03T00:00:00Z"},
        {"id": "b", "summary_metrics": {"acc": 0.9}, "created_at": "2024-01-01T00:00:00Z"},
        {"id": "c", "summary_metrics": {}, "created_at": "2024-01-02T00:00:00Z"},
        {"id": "d", "summary_metrics": {"acc": 0.7}, "created_at": "2024-01-04T00:00:00Z"},
    ]
    ids = lambda order: [d["id"] for d in sorted(docs, key=sort_key(order))]  # noqa: E731
    assert ids("+summary_metrics.acc") == ["c", "a", "d", "b"]  # missing first
    assert ids("-summary_metrics.acc") == ["b", "d", "a", "c"]
    assert ids("+created_at") == ["b", "c", "a", "d"]
    assert ids("-created_at") == ["d", "a", "c", "b"]
    mixed = [{"v": "x"}, {"v": 2}, {"v": None}, {"v": 1.5}, {"v": True}]
    assert [d["v"] for d in sorted(mixed, key=sort_key("+v"))] == [None, 1.5, 2, "x", True]


def test_sort_key_multiple_fields() -> None:
    docs = [{"g": 1, "n": "b"}, {"g": 2, "n": "a"}, {"g": 1, "n": "a"}]
    assert sorted(docs, key=sort_key("-g,+n")) == [{"g": 2, "n": "a"}, {"g": 1, "n": "a"}, {"g": 1, "n": "b"}]
