"""The W&B media objects an artifact can hold via ``Artifact.add(obj, name)`` / ``get(name)``.

W&B accepts only its ``WBValue`` types there (Table, Classes, Image, Audio, ...); a plain dict or a
list is refused, because ``get`` must know how to rebuild the object from the stored file.  We
support the two that are pure data:

* :class:`Table` stored as ``<name>.table.json`` in W&B's layout
  ``{"_type": "table", "columns": [...], "data": [[...], ...], "ncols": N, "nrows": M,
  "column_types": {...}}``, so a table logged here opens in W&B and the other way round;
* :class:`Classes` stored as ``<name>.classes.json``: ``{"_type": "classes", "class_set": [...]}``.

Anything else raises :class:`UnsupportedObjectError` (an ``ArtifactFSError`` and a
``TypeError``) naming what is supported.  Serialisation is deterministic (same table, same bytes,
same md5), so re-logging an unchanged table is a no-op version-wise.

Integration: ``Artifact.add(obj, name, overwrite)`` calls :func:`serialize` and adds the bytes as
the entry it names; ``Artifact.get(name)`` tries :func:`candidate_entry_names` in order and feeds
the first entry found to :func:`deserialize`.
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable, Sequence

from . import wb_types
from .errors import ArtifactFSError, ManifestError

TABLE_SUFFIX = ".table.json"
CLASSES_SUFFIX = ".classes.json"
SUPPORTED = ("Table", "Classes")
_DEFAULT_COLUMNS = ["Input", "Output", "Expected"]  # W&B's Table() default
LOG_MODES = ("IMMUTABLE", "MUTABLE", "INCREMENTAL")


class UnsupportedObjectError(ArtifactFSError, TypeError):
    """An object ``Artifact.add`` cannot store (only W&B value types are accepted)."""

    http_status = 400


class IncompatibleCellError(ArtifactFSError, TypeError):
    """A table cell whose type does not fit its column's (W&B refuses the row with a TypeError)."""


def _assign(column: str, current: wb_types.WBType, value: Any) -> wb_types.WBType:
    new = current.assign(value)
    if new is wb_types.INVALID:
        raise IncompatibleCellError(
            f"Data row contained incompatible types: column {column!r}: {value!r} of type "
            f"{wb_types.type_of(value)!r} is not assignable to {current!r}")
    return new


def _plain(value: Any, where: str) -> Any:
    """A JSON-ready copy of a cell: numpy scalars/arrays become Python values; anything JSON
    cannot hold is refused here, at add time, rather than when the artifact is written."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise UnsupportedObjectError(f"{where}: dict keys must be strings, got {k!r}")
            out[k] = _plain(v, where)
        return out
    for attr in ("tolist", "item"):  # numpy / pandas scalars and arrays, without importing them
        fn = getattr(value, attr, None)
        if callable(fn):
            return _plain(fn(), where)
    raise UnsupportedObjectError(
        f"{where}: a {type(value).__name__} cannot be stored in a table; use None, bool, int, float, "
        f"str, or lists/dicts of those")


def _nan_as_null(value: Any) -> Any:
    """W&B writes a NaN cell (also inside lists and dicts) as null; infinities stay as they are."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, list):
        return [_nan_as_null(v) for v in value]
    if isinstance(value, dict):
        return {k: _nan_as_null(v) for k, v in value.items()}
    return value


def _cells_equal(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_cells_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b if isinstance(a, bool) or isinstance(b, bool) else a == b


class Table:
    """A table of rows, the W&B ``wandb.Table`` data model: named columns, rows as lists."""

    _log_type = "table"

    def __init__(self, columns: Sequence[str] | None = None, data: Sequence[Sequence[Any]] | None = None,
                 rows: Sequence[Sequence[Any]] | None = None, dataframe: Any = None,
                 optional: bool | Sequence[bool] = True, allow_mixed_types: bool = False,
                 log_mode: str = "IMMUTABLE") -> None:
        if dataframe is not None:
            if columns is not None or data is not None or rows is not None:
                raise ValueError("pass either dataframe or columns/data, not both")
            columns = [str(c) for c in dataframe.columns]
            data = dataframe.values.tolist()
        if data is None:
            data = rows
        if columns is None:
            if data:
                raise ValueError("Table(data=...) needs columns=[...] naming each column")
            columns = list(_DEFAULT_COLUMNS)
        columns = list(columns)
        for c in columns:
            if not isinstance(c, str) or not c:
                raise ValueError(f"column names must be non-empty strings, got {c!r}")
        if len(set(columns)) != len(columns):
            raise ValueError(f"column names must be unique, got {columns}")
        self._columns: list[str] = columns
        self._data: list[list[Any]] = []
        #: each column's W&B type so far (client/wb_types.py): written as column_types
        if log_mode not in LOG_MODES:
            raise ValueError(f"log_mode must be one of {', '.join(LOG_MODES)}, got {log_mode!r}")
        self.log_mode = log_mode
        flags = [optional] * len(columns) if isinstance(optional, bool) else list(optional)
        if len(flags) != len(columns) or not all(isinstance(f, bool) for f in flags):
            raise ValueError(f"optional must be a bool or one bool per column ({len(columns)}), got {optional!r}")
        base = wb_types.ANY if allow_mixed_types else wb_types.UNKNOWN
        self._types: list[wb_types.WBType] = [wb_types.optional(base) if f else base for f in flags]
        for row in data or []:
            self.add_data(*row)

    # -- the W&B surface

    @property
    def columns(self) -> list[str]:
        return list(self._columns)

    @property
    def data(self) -> list[list[Any]]:
        return [list(r) for r in self._data]

    @property
    def ncols(self) -> int:
        return len(self._columns)

    @property
    def nrows(self) -> int:
        return len(self._data)

    def add_data(self, *data: Any) -> None:
        """Append one row; it must have one value per column."""
        if len(data) != len(self._columns):
            raise ValueError(f"this table has {len(self._columns)} columns {self._columns}; "
                             f"the row has {len(data)} values")
        row = [_plain(v, f"row {len(self._data)}") for v in data]
        self._types = [_assign(c, t, v) for c, t, v in zip(self._columns, self._types, row)]
        self._data.append(row)

    def add_column(self, name: str, data: Sequence[Any], optional: bool = False) -> None:
        """Append a column; it must have one value per existing row (any length if none yet)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"column names must be non-empty strings, got {name!r}")
        if name in self._columns:
            raise ValueError(f"column {name!r} already exists")
        values = [_plain(v, f"column {name!r}") for v in data]
        if self._data and len(values) != len(self._data):
            raise ValueError(f"column {name!r} has {len(values)} values but the table has "
                             f"{len(self._data)} rows")
        # W&B types an added column from "unknown" ("none or unknown" if optional): a None in a
        # column that is not optional is refused
        new_type = wb_types.optional(wb_types.UNKNOWN) if optional else wb_types.UNKNOWN
        for v in values:
            new_type = _assign(name, new_type, v)
        types = self._types
        if not self._data:
            for _ in values:
                types = [_assign(c, t, None) for c, t in zip(self._columns, types)]
            self._data = [[None] * len(self._columns) for _ in values]
        self._types = [*types, new_type]
        self._columns.append(name)
        for row, v in zip(self._data, values):
            row.append(v)

    def get_column(self, name: str, convert_to: str | None = None) -> list[Any]:
        """The values of a column; ``convert_to="numpy"`` gives a numpy array if numpy is there."""
        try:
            i = self._columns.index(name)
        except ValueError:
            raise KeyError(f"no column {name!r}; columns are {self._columns}") from None
        values = [r[i] for r in self._data]
        if convert_to == "numpy":
            import numpy  # optional: only when asked for

            return numpy.array(values)  # type: ignore[return-value]
        if convert_to is not None:
            raise ValueError(f"convert_to must be None or 'numpy', got {convert_to!r}")
        return values

    def get_index(self) -> list[int]:
        return list(range(len(self._data)))

    def get_dataframe(self) -> Any:
        import pandas  # optional: only when asked for

        return pandas.DataFrame(self.data, columns=self.columns)

    def iterrows(self) -> Iterable[tuple[int, list[Any]]]:
        return enumerate(self.data)

    # -- value semantics

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Table):
            return NotImplemented
        return (self._columns == other._columns and len(self._data) == len(other._data)
                and all(_cells_equal(a, b) for a, b in zip(self._data, other._data)))

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"Table(columns={self._columns!r}, nrows={len(self._data)})"

    # -- W&B JSON layout

    def to_json(self) -> dict[str, Any]:
        type_map = {c: t.to_json() for c, t in zip(self._columns, self._types)}
        return {
            "_type": "table",
            "column_types": {"params": {"type_map": type_map}, "wb_type": "typedDict"},
            "columns": self.columns,
            "data": [[_nan_as_null(v) for v in row] for row in self._data],
            "log_mode": self.log_mode,
            "ncols": self.ncols,
            "nrows": self.nrows,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Table":
        if not isinstance(obj, dict) or obj.get("_type") not in ("table", "table-file"):
            raise ManifestError("not a W&B table JSON (expected \"_type\": \"table\")")
        columns, data = obj.get("columns"), obj.get("data", [])
        if not isinstance(columns, list) or not isinstance(data, list):
            raise ManifestError("a W&B table JSON needs a 'columns' list and a 'data' list of rows")
        try:
            return cls(columns=columns, data=data)
        except (ValueError, TypeError) as exc:
            raise ManifestError(f"invalid W&B table JSON: {exc}") from None


class Classes:
    """A class set (id -> name and more), the W&B ``wandb.Classes`` used by masks and boxes."""

    _log_type = "classes"

    def __init__(self, class_set: Sequence[dict[str, Any]]) -> None:
        items = []
        for c in class_set:
            if not isinstance(c, dict) or "id" not in c or not isinstance(c["id"], int):
                raise ValueError(f"each class needs an integer 'id' (and usually a 'name'), got {c!r}")
            items.append(_plain(dict(c), "Classes"))
        self._class_set = items

    @property
    def class_set(self) -> list[dict[str, Any]]:
        return [dict(c) for c in self._class_set]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Classes) and self._class_set == other._class_set

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Classes({self._class_set!r})"

    def to_json(self) -> dict[str, Any]:
        return {"_type": "classes", "class_set": self.class_set}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Classes":
        if not isinstance(obj, dict) or obj.get("_type") != "classes" or not isinstance(obj.get("class_set"), list):
            raise ManifestError("not a W&B classes JSON (expected \"_type\": \"classes\" and a 'class_set')")
        try:
            return cls(obj["class_set"])
        except ValueError as exc:
            raise ManifestError(f"invalid W&B classes JSON: {exc}") from None


_SUFFIX_BY_TYPE: dict[type, str] = {Table: TABLE_SUFFIX, Classes: CLASSES_SUFFIX}
_TYPE_BY_SUFFIX: dict[str, type] = {v: k for k, v in _SUFFIX_BY_TYPE.items()}


def entry_name_for(obj: Any, name: str) -> str:
    """``"my_table"`` -> ``"my_table.table.json"`` (kept if the suffix is already there)."""
    suffix = _SUFFIX_BY_TYPE.get(type(obj))
    if suffix is None:
        raise UnsupportedObjectError(
            f"Artifact.add() cannot store a {type(obj).__name__}: supported objects are "
            f"{', '.join(SUPPORTED)} (client.objects). Write other data to a file and use add_file() "
            f"or new_file() instead")
    if not isinstance(name, str) or not name.strip("/"):
        raise ValueError(f"an object needs a non-empty name inside the artifact, got {name!r}")
    name = name.strip("/")
    return name if name.endswith(suffix) else name + suffix


def serialize(obj: Any, name: str) -> tuple[str, bytes]:
    """``(entry name, bytes)`` to store for ``Artifact.add(obj, name)``: the bytes W&B writes
    (``json.dumps(..., sort_keys=True)``: default separators, ASCII escapes), so the digest of a
    table or classes entry is the one W&B computes for the same object."""
    entry_name = entry_name_for(obj, name)
    payload = json.dumps(obj.to_json(), sort_keys=True)
    return entry_name, payload.encode("utf-8")


def candidate_entry_names(name: str) -> list[str]:
    """The entry names ``Artifact.get(name)`` looks for, in order: the name itself when it
    already has a known suffix, else the name with each suffix."""
    name = name.strip("/")
    for suffix in _TYPE_BY_SUFFIX:
        if name.endswith(suffix):
            return [name]
    return [name + suffix for suffix in _TYPE_BY_SUFFIX]


def is_object_entry(entry_name: str) -> bool:
    return any(entry_name.endswith(s) for s in _TYPE_BY_SUFFIX)


def deserialize(entry_name: str, data: bytes) -> Table | Classes:
    """Rebuild the object stored at ``entry_name``; ManifestError if the bytes are not one."""
    for suffix, cls in _TYPE_BY_SUFFIX.items():
        if entry_name.endswith(suffix):
            try:
                obj = json.loads(data.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ManifestError(f"{entry_name} is not valid JSON: {exc}") from None
            return cls.from_json(obj)  # type: ignore[attr-defined]
    raise UnsupportedObjectError(
        f"{entry_name} is not a stored object: Artifact.get() reads entries ending in "
        f"{', '.join(_TYPE_BY_SUFFIX)}; use get_entry()/download() for plain files")
