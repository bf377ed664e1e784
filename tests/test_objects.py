"""Table / Classes objects for Artifact.add/get: the W&B JSON layout, round trips, refusals."""

from __future__ import annotations

import json
import math

import pytest

from client.errors import ArtifactFSError, ManifestError
from client.hashing import md5_bytes
from client.objects import (
    Classes,
    Table,
    UnsupportedObjectError,
    candidate_entry_names,
    deserialize,
    is_object_entry,
    serialize,
)


def seed_table() -> Table:
    # The seed's example: wandb.Table(columns=["a", "b", "c"], data=[[i, i*2, 2**i]])
    return Table(columns=["a", "b", "c"], data=[[i, i * 2, 2 ** i] for i in range(4)])


def test_table_basics() -> None:
    t = seed_table()
    assert t.columns == ["a", "b", "c"]
    assert t.data[3] == [3, 6, 8]
    assert (t.ncols, t.nrows) == (3, 4)
    assert t.get_column("c") == [1, 2, 4, 8]
    with pytest.raises(KeyError, match="no column 'z'"):
        t.get_column("z")
    t.data[0][0] = 99  # a copy: the table is not changed behind its back
    assert t.data[0][0] == 0
    assert Table().columns == ["Input", "Output", "Expected"]


def test_add_data_and_add_column() -> None:
    t = Table(columns=["x"])
    t.add_data(1)
    t.add_data(2)
    t.add_column("y", ["a", "b"])
    assert t.data == [[1, "a"], [2, "b"]]
    with pytest.raises(ValueError, match="has 1 values but the table has 2 rows"):
        t.add_column("z", ["only one"])
    with pytest.raises(ValueError, match="already exists"):
        t.add_column("x", [0, 0])
    with pytest.raises(ValueError, match="2 columns"):
        t.add_data(1, 2, 3)
    empty = Table(columns=["a"])
    empty.add_column("b", [1, 2])
    assert empty.data == [[None, 1], [None, 2]]


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="unique"):
        Table(columns=["a", "a"])
    with pytest.raises(ValueError, match="columns"):
        Table(data=[[1]])
    with pytest.raises(ValueError):
        Table(columns=[""])
    assert Table(columns=["a"], rows=[[1], [2]]).nrows == 2


def test_cells_must_be_json_values() -> None:
    with pytest.raises(UnsupportedObjectError, match="object"):
        Table(columns=["a"], data=[[object()]])
    with pytest.raises(UnsupportedObjectError, match="keys must be strings"):
        Table(columns=["a"], data=[[{1: "x"}]])
    t = Table(columns=["nested", "pair"], data=[[{"k": [1, 2.5, None, True]}, (1, 2)]])
    assert t.data == [[{"k": [1, 2.5, None, True]}, [1, 2]]]
    with pytest.raises(TypeError, match="incompatible"):  # W&B refuses a list in a dict column
        Table(columns=["nested"], data=[[{"k": [1]}], [(1, 2)]])


def test_equality() -> None:
    assert seed_table() == seed_table()
    other = seed_table()
    other.add_data(9, 9, 9)
    assert seed_table() != other
    assert Table(columns=["a"], data=[[True]]) != Table(columns=["a"], data=[[1]])
    assert Table(columns=["a"], data=[[float("nan")]]) == Table(columns=["a"], data=[[float("nan")]])
    assert Table(columns=["a"]) != Table(columns=["b"])
    assert seed_table() != "not a table"


def test_wandb_json_layout_and_round_trip() -> None:
    t = seed_table()
    entry, data = serialize(t, "my_table")
    assert entry == "my_table.table.json"
    obj = json.loads(data)
    assert obj["_type"] == "table"
    assert obj["columns"] == ["a", "b", "c"]
    assert obj["data"] == [[0, 0, 1], [1, 2, 2], [2, 4, 4], [3, 6, 8]]
    assert (obj["ncols"], obj["nrows"]) == (3, 4)
    assert obj["column_types"]["params"]["type_map"]["a"] == {"params": {"allowed_types": [{"wb_type": "none"}, {"wb_type": "number"}]},
                                                       "wb_type": "union"}  # W&B 0.31: nullable columns
    back = deserialize(entry, data)
    assert isinstance(back, Table) and back == t
    assert Table.from_json(t.to_json()) == t


def test_serialization_is_deterministic() -> None:
    a = serialize(seed_table(), "t")[1]
    b = serialize(seed_table(), "t")[1]
    assert md5_bytes(a) == md5_bytes(b)


def test_names() -> None:
    assert serialize(seed_table(), "dir/t.table.json")[0] == "dir/t.table.json"
    assert serialize(seed_table(), "/dir/t/")[0] == "dir/t.table.json"
    assert candidate_entry_names("t") == ["t.table.json", "t.classes.json"]
    assert candidate_entry_names("t.table.json") == ["t.table.json"]
    assert is_object_entry("x/t.table.json") and not is_object_entry("t.json")
    with pytest.raises(ValueError):
        serialize(seed_table(), "")


def test_reading_a_table_written_by_wandb() -> None:
    # The shape W&B writes, including fields we do not produce (column_types with other wb_types).
    raw = json.dumps({"columns": ["id", "label"], "data": [[1, "cat"], [2, "dog"]], "ncols": 2, "nrows": 2,
                      "_type": "table", "column_types": {"wb_type": "typedDict", "params": {"type_map": {}}}})
    t = deserialize("preds.table.json", raw.encode())
    assert t.get_column("label") == ["cat", "dog"]


def test_classes_round_trip() -> None:
    c = Classes([{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}])
    entry, data = serialize(c, "labels")
    assert entry == "labels.classes.json"
    assert json.loads(data) == {"_type": "classes", "class_set": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}
    assert deserialize(entry, data) == c
    with pytest.raises(ValueError, match="id"):
        Classes([{"name": "no id"}])


@pytest.mark.parametrize("obj", [{"a": 1}, [1, 2], "text", 3, b"bytes", None])
def test_unsupported_objects_are_refused_clearly(obj: object) -> None:
    with pytest.raises(UnsupportedObjectError) as info:
        serialize(obj, "thing")
    err = info.value
    assert isinstance(err, ArtifactFSError) and isinstance(err, TypeError)
    assert "Table" in str(err) and "Classes" in str(err) and "add_file" in str(err)


def test_corrupt_or_foreign_entries() -> None:
    with pytest.raises(ManifestError, match="not valid JSON"):
        deserialize("t.table.json", b"{nope")
    with pytest.raises(ManifestError, match="_type"):
        deserialize("t.table.json", b'{"_type": "image"}')
    with pytest.raises(ManifestError, match="columns"):
        deserialize("t.table.json", b'{"_type": "table", "columns": 3}')
    with pytest.raises(ManifestError, match="invalid"):
        deserialize("t.table.json", b'{"_type": "table", "columns": ["a"], "data": [[1, 2]]}')
    with pytest.raises(UnsupportedObjectError, match="get_entry"):
        deserialize("plain.csv", b"a,b")


def test_numpy_and_pandas_interop() -> None:
    np = pytest.importorskip("numpy")
    t = Table(columns=["x"], data=[[np.float32(1.5)], [np.int64(2)]])
    assert t.data == [[1.5], [2]] and not math.isnan(t.data[0][0])
    assert list(t.get_column("x", convert_to="numpy")) == [1.5, 2.0]
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})
    t2 = Table(dataframe=df)
    assert t2.columns == ["a", "b"] and t2.data == [[1, "x"], [2, "y"]]
    assert t2.get_dataframe().equals(df)
