"""Turn a source's SQL with `{day}`, `{start}`, `{end}` into a warehouse's bound parameters.

Values are not formatted into SQL text: each placeholder becomes the connector's own parameter
marker and its value travels separately. The one exception is the `literal` style, for engines
without bound parameters (connectorx): each placeholder becomes a typed SQL literal written
from the kernel's own `date`/`datetime`/`int` objects (`DATE '2026-11-01'`,
`TIMESTAMP '2026-11-01 00:00:00.000000'`, `1761955200`), never from text a user or a request
supplied; anything else is refused (`sql_literal`). A query without placeholders is wrapped and
filtered on the mapped timestamp column (half-open `[start, end)`) or date column.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol
from zoneinfo import ZoneInfo

ParamStyle = Literal["qmark", "format", "pyformat", "named", "at", "numeric", "literal"]
PLACEHOLDERS = ("day", "start", "end")
PLACEHOLDER = re.compile(r"\{(day|start|end)\}")
BRACED = re.compile(r"(?<!\$)\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}")
"""Anything written like a placeholder: `{name}`, spaces allowed inside; `${name}` is not (a
variable of the warehouse's own SQL, as Databricks has)."""
LIMIT_ALIAS = "ingestd_l"


@dataclass(frozen=True)
class DayWindow:
    """One calendar day in a time zone. `start`/`end` are naive UTC datetimes, half-open."""

    day: dt.date
    start: dt.datetime
    end: dt.datetime
    timezone: str = "UTC"

    @classmethod
    def of(cls, day: dt.date, timezone: str = "UTC") -> DayWindow:
        tz = ZoneInfo(timezone)
        nxt = day + dt.timedelta(days=1)
        start = dt.datetime(day.year, day.month, day.day, tzinfo=tz).astimezone(dt.UTC)
        end = dt.datetime(nxt.year, nxt.month, nxt.day, tzinfo=tz).astimezone(dt.UTC)
        return cls(day, start.replace(tzinfo=None), end.replace(tzinfo=None), timezone)

    def values(self) -> dict[str, Any]:
        return {"day": self.day, "start": self.start, "end": self.end}


@dataclass(frozen=True)
class DayQuery:
    """SQL in a connector's parameter style, with its parameter values (list or dict). In the
    `literal` style the values are in the SQL, `params` is empty and `template` keeps the SQL
    with its `{day}`/`{start}`/`{end}` placeholders, for `with_values`."""

    sql: str
    params: list[Any] | dict[str, Any]
    window: DayWindow
    names: tuple[str, ...] = field(default=())
    template: str | None = None

    def with_window(self, window: DayWindow) -> DayQuery:
        """The literal-style query rendered again on another window (a sub-range of the day: an
        engine reading a day in chunks). Its `sql` differs from what this query's own window gives
        when the values were not the window's datetimes (integer epoch bounds)."""
        if self.template is None:
            raise ValueError("only a literal-style query can be rendered on another window")
        return DayQuery(_literals(self.template, window.values()), [], window, self.names, self.template)

    def with_values(self, **values: Any) -> DayQuery:
        """The same SQL with other parameter values (the conformance kit's injection test). In
        the `literal` style a value that is not a date, datetime or integer is refused with a
        `TypeError` (`sql_literal`): text never becomes SQL."""
        if self.template is not None:
            merged = {**self.window.values(), **values}
            return DayQuery(_literals(self.template, merged), [], self.window, self.names, self.template)
        if isinstance(self.params, dict):
            return DayQuery(self.sql, {**self.params, **values}, self.window, self.names)
        merged = {**self.window.values(), **values}
        return DayQuery(self.sql, [merged[n] for n in self.names], self.window, self.names)


def sql_literal(value: Any) -> str:
    """A day value as a typed SQL literal, for the `literal` style: `DATE '2026-11-01'`,
    `TIMESTAMP '2026-11-01 00:00:00.000000'` (a naive UTC datetime) or an integer (an epoch
    bound). Only those exact types are written; anything else, text above all, is a TypeError."""
    if type(value) is dt.datetime:
        if value.tzinfo is not None:
            raise TypeError("a timestamp written into SQL must be naive UTC")
        return f"TIMESTAMP '{value.strftime('%Y-%m-%d %H:%M:%S.%f')}'"
    if type(value) is dt.date:
        return f"DATE '{value.strftime('%Y-%m-%d')}'"
    if type(value) is int:
        return str(int(value))
    raise TypeError(f"a day value written into SQL must be a date, datetime or int, not {type(value).__name__}")


def _literals(template: str, values: dict[str, Any]) -> str:
    return PLACEHOLDER.sub(lambda m: sql_literal(values[m.group(1)]), template)


def wrap(query: DayQuery, head: str, tail: str) -> DayQuery:
    """`head + query.sql + tail`, the parameters unchanged (and the template wrapped alike)."""
    template = None if query.template is None else f"{head}{query.template}{tail}"
    return DayQuery(f"{head}{query.sql}{tail}", query.params, query.window, query.names, template)


def marker(style: ParamStyle, name: str, position: int) -> str:
    return {
        "qmark": "?",
        "format": "%s",
        "pyformat": f"%({name})s",
        "named": f":{name}",
        "at": f"@{name}",
        "numeric": f"${position}",
    }[style]


def quote_ident(name: str, quote: str = '"') -> str:
    close = {"[": "]"}.get(quote, quote)
    return f"{quote}{name.replace(close, close + close)}{close}"


EPOCH_UNITS: dict[str, int] = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
"""Integer epoch timestamps: units per second (`mapping.timestamp_unit`)."""

AUTO_UNIT_BOUNDS = (100_000_000_000, 100_000_000_000_000, 100_000_000_000_000_000)
"""`timestamp_unit = "auto"`: |value| below 1e11 is seconds, below 1e14 milliseconds, below 1e17
microseconds, else nanoseconds. Exact for times after 1973-03-03 (1e11 ms), and in seconds up to
the year 5138; a millisecond, microsecond or nanosecond time before March 1973 is misread."""


def epoch(t: dt.datetime, unit: str) -> int:
    """A naive UTC datetime as an integer count of `unit` since 1970-01-01."""
    delta = t - dt.datetime(1970, 1, 1)
    per_second = EPOCH_UNITS[unit]
    return (delta.days * 86_400 + delta.seconds) * per_second + delta.microseconds * per_second // 1_000_000


def auto_seconds(column: str) -> str:
    """SQL: an integer epoch column of any unit, in whole seconds (see AUTO_UNIT_BOUNDS)."""
    s, ms, us = AUTO_UNIT_BOUNDS
    return (f"(CASE WHEN ABS({column}) < {s} THEN {column} WHEN ABS({column}) < {ms} THEN {column} / 1000 "
            f"WHEN ABS({column}) < {us} THEN {column} / 1000000 ELSE {column} / 1000000000 END)")


def render(
    sql: str,
    window: DayWindow,
    style: ParamStyle,
    *,
    filter_column: str | None = None,
    filter_kind: Literal["timestamp", "date"] = "timestamp",
    timestamp_unit: str | None = None,
    quote: str = '"',
) -> DayQuery:
    """Bind a source query to one day in the connector's parameter style. A query without
    placeholders is wrapped and filtered on `filter_column`: a date column equals `{day}`; a
    timestamp column lies in `[{start}, {end})`; an integer epoch column (`timestamp_unit`) too,
    with the bounds bound as integers of that unit."""
    sql = sql.strip().rstrip(";").strip()
    unit = None
    if not PLACEHOLDER.search(sql):
        if not filter_column:
            raise ValueError("query has no {day}/{start}/{end} placeholder and no column to filter on")
        col = f"ingestd_q.{quote_ident(filter_column, quote)}"
        if filter_kind == "date":
            cond = f"{col} = {{day}}"
        else:
            if timestamp_unit == "auto":
                col, unit = auto_seconds(col), "s"
            elif timestamp_unit:
                unit = timestamp_unit
            cond = f"{col} >= {{start}} AND {col} < {{end}}"
        sql = f"SELECT * FROM ({sql}) ingestd_q WHERE {cond}"
    if style in ("format", "pyformat"):
        sql = sql.replace("%", "%%")
    values = window.values()
    if unit:
        values.update(start=epoch(window.start, unit), end=epoch(window.end, unit))
    if style == "literal":
        found = tuple(dict.fromkeys(m.group(1) for m in PLACEHOLDER.finditer(sql)))
        return DayQuery(_literals(sql, values), [], window, found, sql)
    names: list[str] = []

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if style in ("pyformat", "named", "at") and name in names:
            return marker(style, name, names.index(name) + 1)
        names.append(name)
        return marker(style, name, len(names))

    text = PLACEHOLDER.sub(substitute, sql)
    if style in ("pyformat", "named", "at"):
        params: list[Any] | dict[str, Any] = {n: values[n] for n in names}
    else:
        params = [values[n] for n in names]
    return DayQuery(text, params, window, tuple(names))


class QueryStyle(Protocol):
    """What binding needs of a connector: its `Capabilities` (of the instance: a connection's
    config may change them, e.g. Snowflake's `lowercase_columns` drops the identifier quote)."""

    @property
    def paramstyle(self) -> ParamStyle: ...

    @property
    def quote(self) -> str: ...


SLICE_ALIAS = "ingestd_s"


def day_query(sql: str, window: DayWindow, style: QueryStyle, *, filter_column: str | None = None,
              filter_kind: Literal["timestamp", "date"] = "timestamp", timestamp_unit: str | None = None) -> DayQuery:
    """`sql` bound to one day for a connector with these capabilities: the one way a day query is
    built, for loads, probes, ready queries and the conformance kit (`day_queries` for slices)."""
    return render(sql, window, style.paramstyle, filter_column=filter_column, filter_kind=filter_kind,
                  timestamp_unit=timestamp_unit, quote=style.quote)


def sub_windows(window: DayWindow, k: int) -> list[DayWindow]:
    """`window` cut into k half-open sub-ranges of equal length (to the microsecond); each keeps
    the window's day and time zone, and together they cover it exactly, without overlap."""
    if k < 1:
        raise ValueError("k must be at least 1")
    span = window.end - window.start
    bounds = [window.start + span * i // k for i in range(k)] + [window.end]
    return [DayWindow(window.day, bounds[i], bounds[i + 1], window.timezone) for i in range(k)]


def day_queries(sql: str, window: DayWindow, style: QueryStyle, *, slices: int = 1,
                slice_column: str | None = None, filter_column: str | None = None,
                filter_kind: Literal["timestamp", "date"] = "timestamp",
                timestamp_unit: str | None = None) -> list[DayQuery]:
    """The day query of `sql` cut into `slices` disjoint queries whose rows together are the day's.

    By time (no `slice_column`): `{start}`/`{end}` are bound to k equal sub-ranges of the day
    (`{day}` keeps the day). By column: the day query is wrapped k times as `SELECT * FROM (<day
    query>) ingestd_s WHERE COALESCE(ABS(MOD(ingestd_s.<column>, k)), 0) = i`, the column quoted
    with the connector's own quote; ABS keeps negative values and COALESCE puts NULLs in slice 0.
    """
    def one(w: DayWindow) -> DayQuery:
        return day_query(sql, w, style, filter_column=filter_column, filter_kind=filter_kind,
                         timestamp_unit=timestamp_unit)

    if slices == 1:
        return [one(window)]
    if slice_column:
        whole = one(window)
        col = f"{SLICE_ALIAS}.{quote_ident(slice_column, style.quote)}"
        return [wrap(whole, "SELECT * FROM (\n",
                     f"\n) {SLICE_ALIAS} WHERE COALESCE(ABS(MOD({col}, {slices})), 0) = {i}")
                for i in range(slices)]
    return [one(w) for w in sub_windows(window, slices)]


def uses_placeholders(sql: str) -> bool:
    return bool(PLACEHOLDER.search(sql))


def placeholder_mistakes(sql: str) -> list[str]:
    """What in `sql` looks like a placeholder but is not one of {day}, {start}, {end} (an unknown
    name such as `{begin}`, or a known one written with spaces): each said in a sentence. Such
    text would reach the warehouse as it is and fail every load with a syntax error."""
    known = ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
    out: list[str] = []
    for match in BRACED.finditer(sql):
        name, text = match.group(1), match.group(0)
        if name in PLACEHOLDERS:
            if text != f"{{{name}}}":
                out.append(f"placeholder {text!r} must be written {{{name}}}, without spaces")
        else:
            out.append(f"unknown placeholder {{{name}}} (known: {known})")
    return list(dict.fromkeys(out))


def limit_query(query: DayQuery, rows: int) -> DayQuery:
    """`query` limited to its first `rows` rows in the warehouse: `SELECT * FROM (<day query>)
    ingestd_l LIMIT n`, the parameters unchanged. `rows` is an integer the kernel checked (never
    text a user or a request supplied), so it is written into the SQL as a literal: not every
    warehouse takes a bound parameter in LIMIT."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise ValueError(f"a row limit is a non-negative integer, got {rows!r}")
    return wrap(query, "SELECT * FROM (\n", f"\n) {LIMIT_ALIAS} LIMIT {int(rows)}")
