"""The MongoDB-style filters of the W&B API (``Api.runs(filters=...)``, ``Api.registries(filter=...)``,
``.collections(filter=...)``, ``.versions(filter=...)``), evaluated over plain dicts.

Why here and pure: the embedded store and the server both filter the same documents (a run with
``config`` / ``summary_metrics``, a collection with ``tag``, a version with ``alias`` / ``metadata``),
so the semantics live in one function with no I/O, tested on its own.  The caller builds the
document (e.g. ``{"name": ..., "tag": [...], "metadata": {...}, "created_at": datetime}``); this
module only matches and sorts.

Supported, with MongoDB's meaning:

* logical: ``$and``, ``$or``, ``$nor`` (lists of filters), ``$not`` (on one field);
* comparison: ``$eq $ne $gt $gte $lt $lte $in $nin``, plus ``$exists``, ``$regex`` (with
  ``$options`` i/m/s/x), ``$all``, ``$size``;
* ``{"field": value}`` is ``$eq``; ``{"a.b.c": ...}`` walks nested dicts (and lists of dicts);
* a list field (tags, aliases) matches when the whole list or any element matches, so
  ``{"tag": "prod"}`` finds a collection tagged ``prod``; ``$ne``/``$nin`` match only when no
  element matches; a missing field matches ``$ne``, ``$nin`` and ``$exists: false`` only;
* ordering compares like with like (numbers with numbers, strings with strings, datetimes with
  datetimes, where an ISO 8601 string counts as a datetime when the other side is one); a value of
  another type never matches ``$gt``/``$lt``/..., as in MongoDB;
* ``True`` is not ``1`` (MongoDB keeps booleans apart from numbers).

Anything else (an unknown ``$operator``, a ``$and`` that is not a list, a bad regex) raises
:class:`~client.errors.InvalidNameError` (a ``ValueError``) saying what is allowed.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timezone
from functools import total_ordering
from typing import Any, Callable, Iterable

from .errors import InvalidNameError

LOGICAL = ("$and", "$or", "$nor")
FIELD_OPERATORS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists",
                   "$regex", "$options", "$not", "$all", "$size")

_MISSING = object()


class FilterError(InvalidNameError):
    """A filter that is not valid MongoDB query syntax, or uses an operator we do not support."""


# --------------------------------------------------------------------------- paths


def resolve(doc: Any, path: str) -> list[Any]:
    """Every value a dotted path reaches in ``doc`` (MongoDB walks into lists of sub-documents);
    an empty list means the field is missing."""
    values = [doc]
    for part in path.split("."):
        nxt: list[Any] = []
        for v in values:
            if isinstance(v, dict):
                if part in v:
                    nxt.append(v[part])
            elif isinstance(v, (list, tuple)):
                if part.isdigit() and int(part) < len(v):
                    nxt.append(v[int(part)])
                else:
                    nxt.extend(item[part] for item in v if isinstance(item, dict) and part in item)
        values = nxt
        if not values:
            break
    return values


def _candidates(values: list[Any]) -> list[Any]:
    """Each value and, for list values, each element: what a list-aware operator compares."""
    out: list[Any] = []
    for v in values:
        out.append(v)
        if isinstance(v, (list, tuple)):
            out.extend(v)
    return out


# --------------------------------------------------------------------------- comparison


def _as_datetime(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=timezone.utc)
    if isinstance(value, str) and len(value) >= 10 and value[4:5] == "-":
        try:
            return _as_datetime(datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            return None
    return None


def _bracket(value: Any) -> int:
    """MongoDB's type order, used to decide what is comparable and to sort mixed fields."""
    if value is None or value is _MISSING:
        return 0
    if isinstance(value, bool):
        return 5
    if isinstance(value, (int, float)):
        return 1
    if isinstance(value, str):
        return 2
    if isinstance(value, dict):
        return 3
    if isinstance(value, (list, tuple)):
        return 4
    if isinstance(value, (datetime, date)):
        return 6
    return 7


def _coerce_pair(a: Any, b: Any) -> tuple[Any, Any] | None:
    """(a, b) made comparable, or None when MongoDB would not compare them."""
    if isinstance(a, (datetime, date)) or isinstance(b, (datetime, date)):
        da, db = _as_datetime(a), _as_datetime(b)
        return (da, db) if da is not None and db is not None else None
    if _bracket(a) != _bracket(b) or _bracket(a) in (3, 4, 7):
        return None
    return a, b


def _equal(a: Any, b: Any) -> bool:
    if isinstance(b, re.Pattern):
        return isinstance(a, str) and b.search(a) is not None
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    pair = _coerce_pair(a, b)
    if pair is not None:
        return pair[0] == pair[1]
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a is None and b is None


def _eq_any(values: list[Any], target: Any) -> bool:
    if target is None and not values:
        return True  # {"field": None} matches a missing field, as in MongoDB
    return any(_equal(v, target) for v in _candidates(values))


_ORDER_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "$gt": lambda a, b: a > b,
    "$gte": lambda a, b: a >= b,
    "$lt": lambda a, b: a < b,
    "$lte": lambda a, b: a <= b,
}


def _ordered(values: list[Any], op: str, target: Any) -> bool:
    for v in _candidates(values):
        pair = _coerce_pair(v, target)
        if pair is not None and _ORDER_OPS[op](*pair):
            return True
    return False


def _compile_regex(pattern: Any, options: Any = "") -> re.Pattern[str]:
    if isinstance(pattern, re.Pattern):
        return pattern
    if not isinstance(pattern, str):
        raise FilterError(f"$regex needs a string pattern, got {pattern!r}")
    if not isinstance(options, str) or set(options) - set("imsx"):
        raise FilterError(f"$options must be made of the letters i, m, s, x; got {options!r}")
    flags = 0
    for letter, flag in (("i", re.I), ("m", re.M), ("s", re.S), ("x", re.X)):
        if letter in options:
            flags |= flag
    try:
        return re.compile(pattern, flags)
    except re.error as exc:
        raise FilterError(f"invalid $regex {pattern!r}: {exc}") from None


def _as_list(op: str, value: Any) -> list[Any]:
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise FilterError(f"{op} needs a list, got {value!r}")
    return list(value)


# --------------------------------------------------------------------------- matching


def _is_operator_doc(value: Any) -> bool:
    if not isinstance(value, dict) or not value:
        return False
    dollar = [k.startswith("$") for k in value]
    if any(dollar) and not all(dollar):
        raise FilterError(f"cannot mix operators and field names in one condition: {sorted(value)}")
    return all(dollar)


def _match_operators(values: list[Any], ops: dict[str, Any]) -> bool:
    for op, arg in ops.items():
        if op == "$options":
            if "$regex" not in ops:
                raise FilterError("$options is only valid next to $regex")
            continue
        if not _match_operator(values, op, arg, ops):
            return False
    return True


def _match_operator(values: list[Any], op: str, arg: Any, ops: dict[str, Any]) -> bool:
    if op == "$eq":
        return _eq_any(values, arg)
    if op == "$ne":
        return not _eq_any(values, arg)
    if op in _ORDER_OPS:
        return _ordered(values, op, arg)
    if op == "$in":
        return any(_eq_any(values, t) for t in _as_list(op, arg))
    if op == "$nin":
        return not any(_eq_any(values, t) for t in _as_list(op, arg))
    if op == "$exists":
        if not isinstance(arg, bool):
            raise FilterError(f"$exists needs true or false, got {arg!r}")
        return bool(values) == arg
    if op == "$regex":
        rx = _compile_regex(arg, ops.get("$options", ""))
        return any(isinstance(v, str) and rx.search(v) for v in _candidates(values))
    if op == "$not":
        if isinstance(arg, (str, re.Pattern)):
            return not _match_operator(values, "$regex", arg, {"$regex": arg})
        if not _is_operator_doc(arg):
            raise FilterError(f"$not needs an operator expression or a regex, got {arg!r}")
        return not _match_operators(values, arg)
    if op == "$all":
        wanted = _as_list(op, arg)
        return bool(wanted) and all(_eq_any(values, t) for t in wanted)
    if op == "$size":
        if not isinstance(arg, int) or isinstance(arg, bool) or arg < 0:
            raise FilterError(f"$size needs a non-negative integer, got {arg!r}")
        return any(isinstance(v, (list, tuple)) and len(v) == arg for v in values)
    if op in LOGICAL:
        raise FilterError(f"{op} belongs at the top of a filter (or inside another $and/$or/$nor), "
                          f"not under a field")
    raise FilterError(f"unsupported filter operator {op!r}; supported: "
                      f"{', '.join(LOGICAL + FIELD_OPERATORS)}")


def _match_field(doc: Any, path: str, condition: Any) -> bool:
    if not path:
        raise FilterError("a filter field name must not be empty")
    values = resolve(doc, path)
    if _is_operator_doc(condition):
        return _match_operators(values, condition)
    return _eq_any(values, condition)


def _subfilters(op: str, value: Any) -> list[dict[str, Any]]:
    subs = _as_list(op, value)
    if not subs:
        raise FilterError(f"{op} needs a non-empty list of filters")
    for s in subs:
        if not isinstance(s, dict):
            raise FilterError(f"each element of {op} must be a filter object, got {s!r}")
    return subs


def matches(doc: dict[str, Any], filter: dict[str, Any] | None) -> bool:
    """Does ``doc`` satisfy the MongoDB-style ``filter``?  ``None`` or ``{}`` matches everything."""
    if filter is None:
        return True
    if not isinstance(filter, dict):
        raise FilterError(f"a filter must be a dict, got {type(filter).__name__}")
    for key, value in filter.items():
        if not isinstance(key, str):
            raise FilterError(f"filter keys must be strings, got {key!r}")
        if key == "$and":
            ok = all(matches(doc, s) for s in _subfilters(key, value))
        elif key == "$or":
            ok = any(matches(doc, s) for s in _subfilters(key, value))
        elif key == "$nor":
            ok = not any(matches(doc, s) for s in _subfilters(key, value))
        elif key.startswith("$"):
            raise FilterError(f"unsupported top-level filter operator {key!r}; use $and, $or or $nor "
                              f"at the top, and put field operators under a field name")
        else:
            ok = _match_field(doc, key, value)
        if not ok:
            return False
    return True


def validate_filter(filter: dict[str, Any] | None) -> None:
    """Raise FilterError now for a malformed filter, instead of at the first document (or never,
    when no document reaches the bad branch).  Evaluates against an empty document."""
    if filter is None:
        return
    _validate(filter)


def _validate(filter: Any) -> None:
    if not isinstance(filter, dict):
        raise FilterError(f"a filter must be a dict, got {type(filter).__name__}")
    for key, value in filter.items():
        if key in LOGICAL:
            for s in _subfilters(key, value):
                _validate(s)
        elif isinstance(key, str) and key.startswith("$"):
            matches({}, {key: value})  # raises the uniform message
        elif _is_operator_doc(value):
            for op, arg in value.items():
                if op not in FIELD_OPERATORS:
                    matches({}, {key: {op: arg}})
                if op == "$not" and isinstance(arg, dict):
                    _validate({key: arg})
            _match_operators([], value)
        else:
            matches({}, {key: value})


def filter_docs(docs: Iterable[dict[str, Any]], filter: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The documents that match, in their order; the filter is validated first."""
    validate_filter(filter)
    return [d for d in docs if matches(d, filter)]


# --------------------------------------------------------------------------- ordering


@total_ordering
class _Desc:
    """Inverts the order of a key so one ``sorted`` call mixes ascending and descending fields."""

    __slots__ = ("key",)

    def __init__(self, key: Any) -> None:
        self.key = key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Desc) and self.key == other.key

    def __lt__(self, other: "_Desc") -> bool:
        return other.key < self.key


def _sortable(values: list[Any]) -> tuple[Any, ...]:
    """A total-order key for a field's value: MongoDB's type bracket first, then the value."""
    if not values:
        return (0, 0)
    v = values[0]
    b = _bracket(v)
    if b == 0:
        return (0, 0)
    if b == 6:
        return (6, _as_datetime(v))
    if b in (1, 2, 5):
        return (b, v)
    return (b, repr(v))


def parse_order(order: str) -> list[tuple[str, bool]]:
    """``"+created_at"`` -> [("created_at", False)]; ``"-a,+b"`` -> [("a", True), ("b", False)].
    No sign means descending, as the W&B API documents."""
    if not isinstance(order, str) or not order.strip():
        raise FilterError(f"order must be a field name prefixed with + or -, got {order!r}")
    out = []
    for part in order.split(","):
        part = part.strip()
        desc = not part.startswith("+")
        field = part[1:] if part[:1] in "+-" else part
        if not field or field.startswith("$") or ".." in field:
            raise FilterError(f"invalid order {part!r}: use +field or -field, e.g. '-summary_metrics.acc'")
        out.append((field, desc))
    return out


def sort_key(order: str) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    """A key function for ``sorted(docs, key=sort_key("-summary_metrics.acc"))``.  Missing and
    null values sort first ascending (last descending); mixed types sort by MongoDB's type order."""
    fields = parse_order(order)

    def key(doc: dict[str, Any]) -> tuple[Any, ...]:
        parts = []
        for field, desc in fields:
            k = _sortable(resolve(doc, field))
            parts.append(_Desc(k) if desc else k)
        return tuple(parts)

    return key
