"""W&B's value types for ``Table`` columns (the ``column_types`` of ``<name>.table.json``).

A table entry's digest is the md5 of its JSON bytes, and those bytes include the column types,
so a table logged here has W&B's digest only if it is typed exactly as W&B 0.31 types it.  The
rules, observed by running wandb offline (tests/test_wandb_fidelity.py holds its outputs):

* a cell's type: None (and a float NaN) ``none``; bool ``boolean``; int/float ``number``; str
  ``string``; a list ``list`` of an element type with a ``length``; a dict ``typedDict`` with one
  type per key.  A list's element type is folded over its items from ``unknown`` (``none or
  unknown`` when the list holds a None); items that do not fit make it ``invalid`` (kept);
* a column starts as ``none or unknown`` (just ``unknown`` with ``Table(optional=False)``;
  ``any`` instead of ``unknown`` with ``allow_mixed_types``; for ``add_column``, ``unknown``
  unless ``optional``) and each new cell is *assigned* to it: ``unknown`` takes the
  cell's type, a list keeps its element type folded with the new items and takes the new length,
  a dict needs no keys beyond the first one's and assigns key by key (a missing key is None);
* a cell that does not fit (a string into a number column, a new dict key) is refused with a
  TypeError, as W&B refuses the row;
* a union lists its members sorted by their names as W&B prints them (``None``, ``Number``,
  ``String[]``, ``{'a': Number}``), which is why ``boolean`` comes before ``none``.
"""

from __future__ import annotations

import math
from typing import Any


class WBType:
    """One W&B type; ``assign`` gives the type after a value is added (INVALID if it cannot be)."""

    name = ""

    def params(self) -> dict[str, Any]:
        return {}

    def assign(self, value: Any) -> WBType:
        return self.assign_type(type_of(value))

    def assign_type(self, other: WBType) -> WBType:
        return self if self == other else INVALID

    def to_json(self) -> dict[str, Any]:
        return {"wb_type": self.name}

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.params() == other.params()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return self.name.capitalize()


class _Simple(WBType):
    def __init__(self, name: str) -> None:
        self.name = name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Simple) and other.name == self.name


class _Invalid(WBType):
    name = "invalid"

    def assign_type(self, other: WBType) -> WBType:
        return self


class _Unknown(WBType):
    name = "unknown"

    def assign_type(self, other: WBType) -> WBType:
        return INVALID if other == NONE else other


class _Any(WBType):
    name = "any"  #: ``Table(allow_mixed_types=True)``: any value but None

    def assign_type(self, other: WBType) -> WBType:
        return INVALID if other == NONE or other is INVALID else self


INVALID: WBType = _Invalid()
UNKNOWN: WBType = _Unknown()
ANY: WBType = _Any()
NONE, STRING, NUMBER, BOOLEAN = _Simple("none"), _Simple("string"), _Simple("number"), _Simple("boolean")


class ListOf(WBType):
    name = "list"

    def __init__(self, element: WBType, length: int | None) -> None:
        self.element, self.length = element, length

    @classmethod
    def of(cls, items: list[Any] | tuple[Any, ...]) -> ListOf:
        element = optional(UNKNOWN) if any(v is None for v in items) else UNKNOWN
        for item in items:
            element = element.assign(item)
        return cls(element, len(items))

    def params(self) -> dict[str, Any]:
        return {"element_type": self.element, "length": self.length}

    def assign(self, value: Any) -> WBType:
        if not hasattr(value, "__iter__"):
            return INVALID
        items = list(value)  # a string or a dict is iterable too, as in W&B
        element = self.element
        for item in items:
            element = element.assign(item)
            if element is INVALID:
                return INVALID
        return ListOf(element, len(items))

    def assign_type(self, other: WBType) -> WBType:
        if isinstance(other, ListOf):
            element = self.element.assign_type(other.element)
            if element is not INVALID:
                return ListOf(element, self.length if self.length == other.length else None)
        return INVALID

    def to_json(self) -> dict[str, Any]:
        return {"params": {"element_type": self.element.to_json(), "length": self.length}, "wb_type": self.name}

    def __repr__(self) -> str:
        return f"{self.element!r}[]"


class DictOf(WBType):
    name = "typedDict"

    def __init__(self, types: dict[str, WBType]) -> None:
        self.types = types

    def params(self) -> dict[str, Any]:
        return {"type_map": self.types}

    def _merge(self, other: dict[str, Any], how: str) -> WBType:
        if set(other) - set(self.types):
            return INVALID
        merged = {}
        for key, t in self.types.items():
            merged[key] = t.assign(other.get(key)) if how == "value" else t.assign_type(other.get(key, UNKNOWN))
            if merged[key] is INVALID:
                return INVALID
        return DictOf(merged)

    def assign(self, value: Any) -> WBType:
        return self._merge(value, "value") if isinstance(value, dict) else INVALID

    def assign_type(self, other: WBType) -> WBType:
        return self._merge(other.types, "type") if isinstance(other, DictOf) else INVALID

    def to_json(self) -> dict[str, Any]:
        return {"params": {"type_map": {k: t.to_json() for k, t in self.types.items()}}, "wb_type": self.name}

    def __repr__(self) -> str:
        return repr(self.types)


class Union(WBType):
    name = "union"

    def __init__(self, members: list[WBType]) -> None:
        self.members: list[WBType]
        flat: list[WBType] = []
        for m in members:
            flat.extend(m.members if isinstance(m, Union) else [m])
        self.members = sorted(flat, key=repr)

    def params(self) -> dict[str, Any]:
        return {"allowed_types": self.members}

    def assign(self, value: Any) -> WBType:
        members = _assign_to_union(self.members, value, as_type=False)
        return INVALID if members is None else Union(members)

    def assign_type(self, other: WBType) -> WBType:
        members: list[WBType] | None = self.members
        for t in (other.members if isinstance(other, Union) else [other]):
            members = _assign_to_union(members, t, as_type=True)  # type: ignore[arg-type]
            if members is None:
                return INVALID
        return Union(members)  # type: ignore[arg-type]

    def to_json(self) -> dict[str, Any]:
        return {"params": {"allowed_types": [m.to_json() for m in self.members]}, "wb_type": self.name}

    def __repr__(self) -> str:
        return " or ".join(repr(m) for m in self.members)


def _assign_to_union(members: list[WBType], item: Any, as_type: bool) -> list[WBType] | None:
    """The first member (``unknown`` aside) that accepts ``item`` becomes its assignment; if none
    does, an ``unknown`` member becomes the item's type; None if nothing can take it."""
    out: list[WBType] = []
    unknowns = 0
    placed = False
    for m in members:
        if placed:
            out.append(m)
        elif m is UNKNOWN:
            unknowns += 1
        else:
            got = m.assign_type(item) if as_type else m.assign(item)
            placed = got is not INVALID
            out.append(got if placed else m)
    if not placed:
        if not unknowns:
            return None
        new = UNKNOWN.assign_type(item) if as_type else UNKNOWN.assign(item)
        if new is INVALID:
            return None
        out.append(new)
        unknowns -= 1
    return Union(out + [UNKNOWN] * unknowns).members


def optional(t: WBType) -> WBType:
    return Union([t, NONE])


def type_of(value: Any) -> WBType:
    """The W&B type of one (JSON-ready) cell value."""
    if value is None or (type(value) is float and math.isnan(value)):
        return NONE
    if isinstance(value, bool):
        return BOOLEAN
    if isinstance(value, (int, float)):
        return NUMBER
    if isinstance(value, str):
        return STRING
    if isinstance(value, (list, tuple)):
        return ListOf.of(value)
    if isinstance(value, dict):
        return DictOf({k: type_of(v) for k, v in value.items()})
    raise TypeError(f"no W&B table type for a {type(value).__name__}")
