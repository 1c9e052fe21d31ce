"""Canonical Arrow schemas, the column mapping of a source, and row validation.

Mapping runs as one DuckDB query per batch over the Arrow data (vectorised, off the GIL): it
builds the canonical columns, the `ids` and `metadata` JSON objects, and a reject reason per
row. Rows with a reason are counted and sampled instead of loaded.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from .errors import ConfigError, PermanentError
from .query import AUTO_UNIT_BOUNDS, EPOCH_UNITS, DayWindow, epoch, quote_ident

UTC_TS = pa.timestamp("us", tz="UTC")
MAX_NAME = 128

EVENTS_SCHEMA = pa.schema([
    ("source", pa.string()),
    ("day", pa.date32()),
    ("timestamp", UTC_TS),
    ("event_name", pa.string()),
    ("event_value", pa.string()),
    ("unit_id", pa.string()),
    ("id_type", pa.string()),
    ("ids", pa.string()),
    ("metadata", pa.string()),
    ("generation", pa.int64()),
    ("ingested_at", UTC_TS),
])

METRICS_SCHEMA = pa.schema([
    ("source", pa.string()),
    ("day", pa.date32()),
    ("unit_id", pa.string()),
    ("id_type", pa.string()),
    ("metric_name", pa.string()),
    ("metric_value", pa.float64()),
    ("numerator", pa.float64()),
    ("denominator", pa.float64()),
    ("generation", pa.int64()),
    ("ingested_at", UTC_TS),
])

SCHEMAS = {"events": EVENTS_SCHEMA, "metrics": METRICS_SCHEMA}


@dataclass
class Mapping:
    """Which query column feeds which schema field (`[sources.NAME.mapping]`).

    `ids` maps id types to columns, in priority order: a row's `unit_id`/`id_type` come from the
    first one that is not null, and `ids` holds every non-null one. `metadata` columns are folded
    into the metadata JSON object; `metadata_json` names a column holding a JSON object whose keys
    are unpacked into it (one level). For metrics, `metric_value` or `numerator` + `denominator`
    give the value (the ratio wins when a row has both); `date` names the day column.
    """

    ids: dict[str, str] = field(default_factory=dict)
    timestamp: str | None = None
    timestamp_unit: Literal["s", "ms", "us", "ns", "auto"] | None = None
    """The timestamp column holds integer epochs in this unit ("auto": by magnitude, see
    `ingestd.core.query.AUTO_UNIT_BOUNDS`). Unset: a timestamp, date or text column; a numeric one
    is still read by magnitude, but a query without placeholders needs the unit to be filtered."""
    event_name: str | None = None
    event_value: str | None = None
    metadata: list[str] = field(default_factory=list)
    metadata_json: str | None = None
    date: str | None = None
    metric_name: str | None = None
    metric_value: str | None = None
    numerator: str | None = None
    denominator: str | None = None

    def check(self, kind: str) -> None:
        if not self.ids:
            raise ConfigError("ids", "map at least one id type to a column, e.g. ids = { user_id = \"user_id\" }")
        if kind == "events":
            for key in ("timestamp", "event_name"):
                if not getattr(self, key):
                    raise ConfigError(key, "required for an events source")
            for key in ("date", "metric_name", "metric_value", "numerator", "denominator"):
                if getattr(self, key):
                    raise ConfigError(key, "only for a metrics source")
        else:
            if not self.metric_name:
                raise ConfigError("metric_name", "required for a metrics source")
            if not self.metric_value and not (self.numerator and self.denominator):
                raise ConfigError("metric_value", "give metric_value, or numerator and denominator")
            if bool(self.numerator) != bool(self.denominator):
                raise ConfigError("numerator", "numerator and denominator go together")
            for key in ("timestamp", "timestamp_unit", "event_name", "event_value", "metadata_json"):
                if getattr(self, key):
                    raise ConfigError(key, "only for an events source")
            if self.metadata:
                raise ConfigError("metadata", "only for an events source")

    def columns(self) -> list[tuple[str, str]]:
        """(mapping key, column) for every mapped column."""
        out = [(f"ids.{k}", v) for k, v in self.ids.items()]
        out += [(f"metadata[{i}]", v) for i, v in enumerate(self.metadata)]
        for key in ("timestamp", "event_name", "event_value", "metadata_json", "date",
                    "metric_name", "metric_value", "numerator", "denominator"):
            if getattr(self, key):
                out.append((key, getattr(self, key)))
        return out

    def filter_column(self, kind: str) -> tuple[str | None, Literal["timestamp", "date"]]:
        if kind == "events":
            return self.timestamp, "timestamp"
        return self.date, "date"

    def day_filter(self, kind: str) -> dict[str, Any]:
        """How a query without placeholders is filtered to a day: the keyword arguments of
        `ingestd.core.query.day_query` (filter_column, filter_kind, timestamp_unit)."""
        column, filter_kind = self.filter_column(kind)
        return {"filter_column": column, "filter_kind": filter_kind,
                "timestamp_unit": self.timestamp_unit if kind == "events" else None}


@dataclass
class MappedBatch:
    rows: pa.RecordBatch
    rejects: Counter[str]
    samples: list[dict[str, Any]]


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


EARLIEST, LATEST = "1900-01-01", "2200-01-01"
"""Timestamps outside [EARLIEST, LATEST) are not times an event happened at but values of the
wrong kind (an epoch in another unit, a sentinel): rejected as `bad_timestamp`."""


def _epoch_expr(col: str, unit: str, arrow_type: pa.DataType) -> str:
    """An integer or decimal epoch in `unit` as TIMESTAMPTZ, NULL when it is outside the
    plausible range (so one absurd value is a rejected row, not a failed batch). Integers in that
    range are scaled as BIGINT (their microseconds fit); other numbers go through HUGEINT."""
    per_second = EPOCH_UNITS[unit]
    lo = epoch(dt.datetime.fromisoformat(EARLIEST), unit)
    hi = epoch(dt.datetime.fromisoformat(LATEST), unit)
    if pa.types.is_integer(arrow_type):
        as_int = f"TRY_CAST({col} AS BIGINT)"
        micros = (f"{as_int} * {1_000_000 // per_second}" if per_second <= 1_000_000
                  else f"{as_int} // {per_second // 1_000_000}")
    else:
        micros = f"CAST(TRY_CAST({col} AS HUGEINT) * 1000000 // {per_second} AS BIGINT)"
    return f"(CASE WHEN {col} >= {lo} AND {col} < {hi} THEN make_timestamptz({micros}) END)"


def _timestamp_expr(col: str, arrow_type: pa.DataType, unit: str | None) -> str:
    """The mapped timestamp column as TIMESTAMPTZ (NULL when it cannot be read as one). A DATE is
    the start of that day in the source's time zone ($tz); a naive timestamp or text is UTC."""
    if pa.types.is_date(arrow_type):
        return f"timezone($tz, CAST({col} AS TIMESTAMP))"
    if pa.types.is_timestamp(arrow_type):
        return f"CAST({col} AS TIMESTAMPTZ)"
    if pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type) or pa.types.is_decimal(arrow_type):
        if unit and unit != "auto":
            return _epoch_expr(col, unit, arrow_type)
        s, ms, us = AUTO_UNIT_BOUNDS
        parts = [(s, "s"), (ms, "ms"), (us, "us")]
        cases = " ".join(f"WHEN abs({col}) < {bound} THEN {_epoch_expr(col, u, arrow_type)}" for bound, u in parts)
        return f"(CASE {cases} ELSE {_epoch_expr(col, 'ns', arrow_type)} END)"
    return f"TRY_CAST(CAST({col} AS VARCHAR) AS TIMESTAMPTZ)"


def _id(col: str) -> str:
    """An id column as text, as it is; empty or whitespace-only counts as missing."""
    return f"(CASE WHEN TRIM(CAST({col} AS VARCHAR)) <> '' THEN CAST({col} AS VARCHAR) END)"


def _ids_json(id_cols: list[tuple[str, str]]) -> str:
    """The `ids` JSON object of the ids that are there (`id_cols`: id type, a text column, NULL
    when missing), written as `json_merge_patch('{}', json_object(...))` writes it (compact, in
    mapping order, missing ones left out) but without building and patching JSON documents:
    keys and values are escaped by DuckDB's `to_json`, the same writer."""
    members = [(f"to_json({_sql_str(t)}) || ':' || to_json({c})", c) for t, c in id_cols]
    if len(members) == 1:
        member, c = members[0]
        return f"(CASE WHEN {c} IS NULL THEN '{{}}' ELSE '{{' || {member} || '}}' END)"
    listed = ", ".join(f"CASE WHEN {c} IS NOT NULL THEN {member} END" for member, c in members)
    return f"('{{' || concat_ws(',', {listed}) || '}}')"


def _text(col: str | None) -> str:
    return "CAST(NULL AS VARCHAR)" if col is None else f"CAST({col} AS VARCHAR)"


def _number(col: str | None) -> str:
    return "CAST(NULL AS DOUBLE)" if col is None else f"TRY_CAST({col} AS DOUBLE)"


class RowMapper:
    """Maps query batches of one partition load to the canonical schema. Not thread-safe: one
    mapper per load, called from one worker thread at a time."""

    def __init__(self, kind: str, mapping: Mapping, window: DayWindow, *, source: str,
                 generation: int, ingested_at: dt.datetime, max_samples: int = 20):
        self.kind = kind
        self.mapping = mapping
        self.window = window
        self.source = source
        self.generation = generation
        self.ingested_at = ingested_at
        self.max_samples = max_samples
        self.samples_kept = 0
        self.schema = SCHEMAS[kind]
        self._sql: str | None = None
        self._input_schema: pa.Schema | None = None
        self._con = duckdb.connect(config={"threads": 1})
        self._con.execute("SET TimeZone = 'UTC'")

    def close(self) -> None:
        self._con.close()

    def _prepare(self, schema: pa.Schema) -> str:
        """The mapping query, in three levels so that DuckDB computes each value once per row:
        `c` reads the mapped columns and computes what is used more than once (each id as text,
        the timestamp, the names, the parsed metadata JSON), `v` what is computed from those
        (the unit id, whether the metadata is an object), and the outer SELECT the canonical
        columns and the reject reason (the first rule a row breaks, in the order below)."""
        names = set(schema.names)
        missing = [(key, col) for key, col in self.mapping.columns() if col not in names]
        if missing:
            said = ", ".join(f"mapping.{k} = {c!r}" for k, c in missing)
            raise PermanentError(f"{said}: not a column of the query result (columns: {', '.join(schema.names)})")

        def q(c: str) -> str:
            return f"src.{quote_ident(c)}"

        def typ(c: str) -> pa.DataType:
            return schema.field(c).type

        m = self.mapping
        first: list[str] = []  # level c: "expression AS name"

        def once(expr: str, name: str) -> str:
            first.append(f"{expr} AS {name}")
            return name

        ids = [(t, once(_id(q(col)), f"_id{i}")) for i, (t, col) in enumerate(m.ids.items())]
        second = ["COALESCE(" + ", ".join(c for _, c in ids) + ") AS _unit"]  # level v
        id_type = "CASE " + " ".join(f"WHEN {c} IS NOT NULL THEN {_sql_str(t)}" for t, c in ids) + " END"
        common = f"""
            $source AS source, CAST($day AS DATE) AS day,
            v._unit AS unit_id, {id_type} AS id_type, {_ids_json(ids)} AS ids,"""
        if self.kind == "events":
            if m.timestamp is None or m.event_name is None:  # Mapping.check refuses such a source
                raise PermanentError("an events mapping needs timestamp and event_name")
            ts = once(_timestamp_expr(q(m.timestamp), typ(m.timestamp), m.timestamp_unit), "_ts")
            ts_missing = once(f"{q(m.timestamp)} IS NULL", "_ts_missing")
            name = once(_text(q(m.event_name)), "_name")
            value = once(_text(q(m.event_value)), "_value") if m.event_value else _text(None)
            # json_merge_patch('{}', x, ...) leaves out null members (all levels) and writes the
            # JSON compactly; folded columns are patched in after the JSON object, each replacing
            # (a NULL one removing) the member of its name. Without folded columns the object test
            # is on the written text (json_merge_patch('{}', x) is x itself when x is not an
            # object), which saves parsing the JSON once more.
            folded = [f"{_sql_str(c)}, {once(q(c), f'_meta{i}')}" for i, c in enumerate(m.metadata)]
            patch = f"json_object({', '.join(folded)})" if folded else None
            bad_meta = "FALSE"
            if m.metadata_json:
                mj = once(f"TRY_CAST(CAST({q(m.metadata_json)} AS VARCHAR) AS JSON)", "_mj")
                mj_given = once(f"{q(m.metadata_json)} IS NOT NULL", "_mj_given")
                if patch:
                    second.append(f"coalesce(json_type({mj}) = 'OBJECT', FALSE) AS _mj_object")
                    is_object = "v._mj_object"
                    with_mj = f"CAST(json_merge_patch('{{}}', {mj}, {patch}) AS VARCHAR)"
                    without = f"CAST(json_merge_patch('{{}}', {patch}) AS VARCHAR)"
                else:
                    second.append(f"CAST(json_merge_patch('{{}}', {mj}) AS VARCHAR) AS _mj_text")
                    is_object = "coalesce(starts_with(v._mj_text, '{'), FALSE)"
                    with_mj, without = "v._mj_text", "'{}'"
                bad_meta = f"({mj_given} AND NOT {is_object})"
                meta = f"CASE WHEN {is_object} THEN {with_mj} ELSE {without} END"
            else:
                meta = f"CAST(json_merge_patch('{{}}', {patch}) AS VARCHAR)" if patch else "'{}'"
            select = f"""
                {ts} AS timestamp, {name} AS event_name, {value} AS event_value, {meta} AS metadata,
                CAST($generation AS BIGINT) AS generation, $ingested_at AS ingested_at,
                CASE
                    WHEN {ts_missing} THEN 'missing_timestamp'
                    WHEN {ts} IS NULL OR {ts} < TIMESTAMPTZ '{EARLIEST}' OR {ts} >= TIMESTAMPTZ '{LATEST}'
                        THEN 'bad_timestamp'
                    WHEN {ts} < $start OR {ts} >= $end THEN 'timestamp_outside_day'
                    WHEN {name} IS NULL OR {name} = '' THEN 'missing_event_name'
                    WHEN length({name}) > {MAX_NAME} THEN 'event_name_too_long'
                    WHEN length({value}) > {MAX_NAME} THEN 'event_value_too_long'
                    WHEN v._unit IS NULL THEN 'missing_unit_id'
                    WHEN {bad_meta} THEN 'bad_metadata_json'
                END AS _reject"""
        else:
            if m.metric_name is None:  # Mapping.check refuses such a source
                raise PermanentError("a metrics mapping needs metric_name")
            name = once(_text(q(m.metric_name)), "_name")
            numbers = {key: (once(_number(q(col)), f"_{key}"), once(f"{q(col)} IS NOT NULL", f"_{key}_given"))
                       for key in ("metric_value", "numerator", "denominator") if (col := getattr(m, key))}
            value = numbers["metric_value"][0] if "metric_value" in numbers else _number(None)
            num = numbers["numerator"][0] if "numerator" in numbers else _number(None)
            den = numbers["denominator"][0] if "denominator" in numbers else _number(None)
            ratio_given = f"({num} IS NOT NULL AND {den} IS NOT NULL)"
            metric_value = (f"CASE WHEN {ratio_given} THEN CASE WHEN {den} = 0 THEN NULL ELSE {num} / {den} END "
                            f"ELSE {value} END")
            bad_number = " OR ".join(f"({given} AND {number} IS NULL)" for number, given in numbers.values()) or "FALSE"
            date_check = ""
            if m.date:
                date = once(f"CAST({q(m.date)} AS DATE)", "_date")
                date_check = f"WHEN {date} <> CAST($day AS DATE) THEN 'date_outside_day'"
            select = f"""
                {name} AS metric_name, {metric_value} AS metric_value,
                {num} AS numerator, {den} AS denominator,
                CAST($generation AS BIGINT) AS generation, $ingested_at AS ingested_at,
                CASE
                    WHEN {name} IS NULL OR {name} = '' THEN 'missing_metric_name'
                    WHEN length({name}) > {MAX_NAME} THEN 'metric_name_too_long'
                    WHEN v._unit IS NULL THEN 'missing_unit_id'
                    WHEN {bad_number} THEN 'bad_number'
                    {date_check}
                    WHEN {value} IS NULL AND NOT {ratio_given} THEN 'missing_value'
                END AS _reject"""
        return f"""
            SELECT {common}{select}
            FROM (SELECT *, {", ".join(second)}
                  FROM (SELECT {", ".join(first)} FROM batch AS src) AS c) AS v"""

    def map(self, batch: pa.RecordBatch) -> MappedBatch:
        if self._sql is None or batch.schema != self._input_schema:
            self._sql = self._prepare(batch.schema)
            self._input_schema = batch.schema
        params = {
            "source": self.source, "day": self.window.day,
            "start": self.window.start.replace(tzinfo=dt.UTC), "end": self.window.end.replace(tzinfo=dt.UTC),
            "tz": self.window.timezone,
            "generation": self.generation, "ingested_at": self.ingested_at,
        }
        used = {k: v for k, v in params.items() if f"${k}" in self._sql}
        self._con.register("batch", batch)
        try:
            table = self._con.sql(self._sql, params=used).to_arrow_table()
        except duckdb.Error as exc:
            raise PermanentError(f"mapping failed: {exc}") from exc
        finally:
            self._con.unregister("batch")
        reasons = table.column("_reject")
        ok = pc.is_null(reasons)
        good = table.select(self.schema.names)
        if reasons.null_count != table.num_rows:  # some rows are rejected (else no copy of the batch)
            good = good.filter(ok)
        if not good.schema.equals(self.schema):
            good = good.cast(self.schema)
        rejects: Counter[str] = Counter()
        samples: list[dict[str, Any]] = []
        if good.num_rows != table.num_rows:
            bad_reasons = reasons.filter(pc.invert(ok))
            for item in pc.value_counts(bad_reasons).to_pylist():
                rejects[item["values"]] += item["counts"]
            room = self.max_samples - self.samples_kept
            if room > 0:
                idx = pc.indices_nonzero(pc.invert(ok)).to_pylist()[:room]
                raw = batch.take(pa.array(idx)).to_pylist()
                for i, row in zip(idx, raw, strict=True):
                    samples.append({"reason": reasons[i].as_py(), "row": _json_safe(row)})
                self.samples_kept += len(samples)
        combined = good.combine_chunks()
        out = combined.to_batches()[0] if combined.num_rows else pa.RecordBatch.from_pylist([], schema=self.schema)
        return MappedBatch(out, rejects, samples)


def _json_safe(row: dict[str, Any]) -> dict[str, Any]:
    safe: dict[str, Any] = json.loads(json.dumps(row, default=str))
    return safe
