"""A query's result columns: the kind of each one's type, how a result schema changed between
two looks (schema drift), and whether a source's mapping can use the columns (`ingestd check`,
`ingestd preview`).

Types are compared by their kind (`family`): text, integer, decimal, float, boolean, date,
timestamp, ... A width or precision change (int32 to int64, a decimal's scale, a time zone on a
timestamp) is not a change of kind, so drivers that pick an integer width per result chunk do not
raise false alarms. A column without a type (Arrow `null`: only NULLs, and the driver could not
tell) matches any kind.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa

from .query import AUTO_UNIT_BOUNDS, PLACEHOLDERS
from .schema import Mapping

NESTED = frozenset({"list", "struct", "map", "union"})
NUMERIC = frozenset({"integer", "float", "decimal"})
WORDS = {"string": "text", "integer": "integers", "float": "floating-point numbers", "decimal": "decimals",
         "boolean": "booleans", "date": "dates", "timestamp": "timestamps", "time": "times of day",
         "duration": "durations", "interval": "intervals", "binary": "bytes", "list": "lists",
         "struct": "structs", "map": "maps", "union": "unions", "null": "only NULLs, without a type"}


def family(t: pa.DataType) -> str:
    """The kind of an Arrow type: `string`, `integer`, `float`, `decimal`, `boolean`, `date`,
    `timestamp`, `time`, `duration`, `interval`, `binary`, `list`, `struct`, `map`, `union`,
    `null`, or the type's own name for anything else (an extension type's storage decides)."""
    if isinstance(t, pa.ExtensionType):
        return family(t.storage_type)
    if pa.types.is_dictionary(t):
        return family(t.value_type)
    checks = [
        ("null", pa.types.is_null), ("boolean", pa.types.is_boolean), ("integer", pa.types.is_integer),
        ("float", pa.types.is_floating), ("decimal", pa.types.is_decimal),
        ("string", lambda x: pa.types.is_string(x) or pa.types.is_large_string(x)
         or getattr(pa.types, "is_string_view", lambda _: False)(x)),
        ("binary", lambda x: pa.types.is_binary(x) or pa.types.is_large_binary(x)
         or pa.types.is_fixed_size_binary(x) or getattr(pa.types, "is_binary_view", lambda _: False)(x)),
        ("date", pa.types.is_date), ("timestamp", pa.types.is_timestamp), ("time", pa.types.is_time),
        ("duration", pa.types.is_duration), ("interval", pa.types.is_interval),
        ("list", lambda x: pa.types.is_list(x) or pa.types.is_large_list(x) or pa.types.is_fixed_size_list(x)
         or getattr(pa.types, "is_list_view", lambda _: False)(x)),
        ("struct", pa.types.is_struct), ("map", pa.types.is_map), ("union", pa.types.is_union),
    ]
    for name, test in checks:
        if test(t):
            return name
    return str(t)


@dataclass(frozen=True)
class Column:
    """One result column: its name, its Arrow type as text, and that type's kind."""

    name: str
    type: str
    family: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "type": self.type, "family": self.family}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Column:
        return cls(str(d["name"]), str(d["type"]), str(d.get("family") or d["type"]))


def columns_of(schema: pa.Schema) -> list[Column]:
    return [Column(f.name, str(f.type), family(f.type)) for f in schema]


@dataclass(frozen=True)
class SchemaChange:
    """How a result schema differs from an earlier one: columns added, removed, and retyped
    (their kind of type changed), in the newer schema's order."""

    added: list[Column] = field(default_factory=list)
    removed: list[Column] = field(default_factory=list)
    retyped: list[tuple[Column, Column]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.retyped)

    def as_dict(self) -> dict[str, Any]:
        return {"added": [{"name": c.name, "type": c.type} for c in self.added],
                "removed": [{"name": c.name, "type": c.type} for c in self.removed],
                "retyped": [{"name": new.name, "from": old.type, "to": new.type} for old, new in self.retyped]}

    def summary(self) -> str:
        parts = []
        if self.added:
            parts.append("added " + ", ".join(f"{c.name} ({c.type})" for c in self.added))
        if self.removed:
            parts.append("removed " + ", ".join(f"{c.name} ({c.type})" for c in self.removed))
        if self.retyped:
            parts.append("retyped " + ", ".join(f"{new.name} ({old.type} -> {new.type})" for old, new in self.retyped))
        return "; ".join(parts) or "no change"


def compare(old: list[Column], new: list[Column]) -> SchemaChange:
    """What changed from `old` to `new`, matching columns by name (exactly, as the mapping does)."""
    before = {c.name: c for c in old}
    after = {c.name: c for c in new}
    retyped = [(before[c.name], c) for c in new if c.name in before and before[c.name].family != c.family
               and "null" not in (before[c.name].family, c.family)]
    return SchemaChange(added=[c for c in new if c.name not in before],
                        removed=[c for c in old if c.name not in after], retyped=retyped)


def roles(mapping: Mapping) -> dict[str, list[str]]:
    """Each mapped column and the mapping keys it feeds (`ids.user_id`, `timestamp`, ...)."""
    out: dict[str, list[str]] = {}
    for key, column in mapping.columns():
        out.setdefault(column, []).append(key)
    return out


@dataclass(frozen=True)
class Finding:
    """What `check_columns` says of one mapped column: an `error` (loads would fail or reject
    every row) or a `note` (allowed, and how it is read)."""

    key: str
    column: str
    level: Literal["error", "note"]
    message: str
    missing: bool = False
    """The column is not in the result at all."""

    def as_dict(self) -> dict[str, Any]:
        return {"key": f"mapping.{self.key}", "column": self.column, "level": self.level, "message": self.message,
                "missing": self.missing}


def column_list(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "") if names else "none"


def missing_message(column: str, names: list[str]) -> str:
    """`column 'evnt' is not in the query's result (columns: ...)`, with a near name if one is."""
    hint = ""
    same_case = [n for n in names if n.lower() == column.lower()]
    if same_case:
        hint = f"; did you mean {same_case[0]!r}? (column names are case-sensitive)"
    elif close := difflib.get_close_matches(column, names, n=1, cutoff=0.6):
        hint = f"; did you mean {close[0]!r}?"
    return f"column {column!r} is not in the query's result (columns: {column_list(names)}){hint}"


def epoch_unit_of(value: Any) -> str | None:
    """The unit an integer epoch value looks like it is in (as `timestamp_unit = "auto"` reads it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            return None
    s, ms, us = AUTO_UNIT_BOUNDS
    size = abs(value)
    return "s" if size < s else "ms" if size < ms else "us" if size < us else "ns"


UNIT_WORDS = {"s": "seconds", "ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds"}


def _unit_fix(sample: Any) -> str:
    unit = epoch_unit_of(sample) if sample is not None else None
    if unit is None:
        return 'set mapping.timestamp_unit to "s", "ms", "us" or "ns"'
    return f'set mapping.timestamp_unit = "{unit}" (its values, e.g. {sample}, look like {UNIT_WORDS[unit]})'


def _kind_of(col: Column) -> str:
    return f"{WORDS.get(col.family, col.family)} ({col.type})"


def _timestamp(m: Mapping, col: Column, filtered: bool, sample: Any) -> tuple[str, str] | None:
    f = col.family
    if f in ("timestamp", "date"):
        return None
    if f == "string":
        return ("note", f"column {col.name!r} is text ({col.type}): allowed; read as ISO-8601 times (UTC unless a "
                        "value carries its zone), and a value that cannot be read is rejected as bad_timestamp")
    if f in NUMERIC:
        if m.timestamp_unit:
            return None
        placeholders = ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
        if filtered:
            return ("error", f"column {col.name!r} holds {_kind_of(col)}: an epoch column needs its unit, as the "
                             f"query has no {placeholders} placeholder and is filtered on it; {_unit_fix(sample)}")
        return ("note", f"column {col.name!r} holds {_kind_of(col)}: read as epochs whose unit is guessed from "
                        f"each value's size (auto); to say it, {_unit_fix(sample)}")
    return ("error", f"column {col.name!r} is {_kind_of(col)}: not usable as a timestamp (map a timestamp, date, "
                     "ISO-8601 text or integer epoch column)")


def _date(col: Column) -> tuple[str, str] | None:
    if col.family in ("date", "timestamp"):
        return None
    if col.family == "string":
        return ("note", f"column {col.name!r} is text ({col.type}): allowed; read as dates (YYYY-MM-DD)")
    return ("error", f"column {col.name!r} is {_kind_of(col)}: not usable as the metric's date (map a DATE, "
                     "a timestamp or YYYY-MM-DD text)")


def _text(col: Column, what: str) -> tuple[str, str] | None:
    if col.family in NESTED or col.family == "binary":
        return ("error", f"column {col.name!r} is {_kind_of(col)}: not usable as {what} (map a text or number "
                         "column, or convert it in the query)")
    return None


def _id(col: Column) -> tuple[str, str] | None:
    if col.family == "float":
        return ("note", f"column {col.name!r} is {_kind_of(col)}: allowed; ids are stored as text, e.g. '12.0'")
    return _text(col, "an id")


def _number(col: Column) -> tuple[str, str] | None:
    if col.family in NUMERIC:
        return None
    if col.family == "string":
        return ("note", f"column {col.name!r} is text ({col.type}): allowed; read as numbers, and a value that "
                        "is not one is rejected as bad_number")
    if col.family == "boolean":
        return ("note", f"column {col.name!r} is {_kind_of(col)}: allowed; read as 1 (true) and 0 (false)")
    return ("error", f"column {col.name!r} is {_kind_of(col)}: not a number (map an integer, decimal or "
                     "floating-point column)")


def _json(col: Column) -> tuple[str, str] | None:
    if col.family == "string":
        return None
    if col.family in ("struct", "map"):
        return ("error", f"column {col.name!r} is {_kind_of(col)}, not JSON text: map its fields with "
                         "mapping.metadata, or turn it into JSON text in the query")
    return ("error", f"column {col.name!r} is {_kind_of(col)}: not JSON text (map a text column holding a JSON "
                     "object)")


def check_columns(kind: str, mapping: Mapping, schema: pa.Schema, *, filtered: bool,
                  sample: dict[str, Any] | None = None) -> list[Finding]:
    """Every mapped column against the query's result `schema`: missing ones and unusable types
    are errors, types that are read in a particular way are notes. `filtered`: the query has no
    placeholders and is filtered on the mapped timestamp or date column. `sample`: one result
    row, to say what an epoch column's unit looks like."""
    names = schema.names
    cols = {c.name: c for c in columns_of(schema)}
    out: list[Finding] = []
    for key, column in mapping.columns():
        col = cols.get(column)
        if col is None:
            out.append(Finding(key, column, "error", missing_message(column, names), missing=True))
            continue
        if col.family == "null":
            out.append(Finding(key, column, "note", f"column {column!r} has no type in the result (only NULLs "
                                                    "in what was read): its values could not be checked"))
            continue
        said: tuple[str, str] | None
        if key == "timestamp":
            said = _timestamp(mapping, col, filtered and kind == "events", (sample or {}).get(column))
        elif key == "date":
            said = _date(col)
        elif key.startswith("ids."):
            said = _id(col)
        elif key in ("event_name", "metric_name"):
            said = _text(col, "a name")
        elif key == "event_value":
            said = _text(col, "an event value")
        elif key in ("metric_value", "numerator", "denominator"):
            said = _number(col)
        elif key == "metadata_json":
            said = _json(col)
        else:  # metadata[i]: any type is folded into the JSON object
            said = None
        if said is not None:
            level, message = said
            out.append(Finding(key, column, "error" if level == "error" else "note", message))
    return out
