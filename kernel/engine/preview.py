"""Reading a few rows of a source without loading anything: `ingestd preview` and the `preview`
request, the columns `ingestd check` verifies, and the schema probes of re-check windows.

Nothing here writes: no run, partition, metering, event or sink row. The row limit is pushed into
the warehouse where the connector can (`Connector.limited`); where it cannot, the first batch of
the unlimited fetch is read and the stream closed, as an abandoned fetch.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

import pyarrow as pa

from ..core.columns import Finding, check_columns, columns_of, roles
from ..core.contracts import Connector, SourceInfo, aclosing_stream
from ..core.errors import ConfigError, IngestdError
from ..core.query import DayQuery, uses_placeholders
from ..core.schema import RowMapper
from .job import SourceQuery

MAX_BATCH = 10_000
"""The batch size a sample is read in, at most (a sample of 20 rows is read in batches of 20)."""

SHOWN = {"events": ["timestamp", "event_name", "event_value", "unit_id", "id_type", "ids", "metadata"],
         "metrics": ["unit_id", "id_type", "metric_name", "metric_value", "numerator", "denominator"]}
"""The mapped columns a preview shows (the canonical schema without source, day, generation and
ingested_at, which a load adds)."""
JSON_COLUMNS = ("ids", "metadata")


@dataclass(frozen=True)
class Sample:
    """At most `rows` rows of a query (`table`, None when none came back), the result's schema
    when known, and whether the limit ran in the warehouse."""

    schema: pa.Schema | None
    table: pa.Table | None
    pushed: bool

    @property
    def rows(self) -> int:
        return self.table.num_rows if self.table is not None else 0

    def first_row(self) -> dict[str, Any] | None:
        if self.table is None or not self.table.num_rows:
            return None
        row: dict[str, Any] = self.table.slice(0, 1).to_pylist()[0]
        return row


async def read_sample(connector: Connector, query: DayQuery, rows: int, source: SourceInfo | None = None) -> Sample:
    """The first `rows` (1 or more) rows of `query`, limited in the warehouse when the connector
    can, else cut here from the first batches of the whole query, whose stream is then closed."""
    if rows < 1:
        raise ValueError("a sample has at least one row")
    limited = connector.limited(query, rows)
    batches: list[pa.RecordBatch] = []
    got = 0
    async with aclosing_stream(connector.fetch(limited or query, min(rows, MAX_BATCH), source)) as stream:
        async for batch in stream:
            part = batch.slice(0, rows - got)
            batches.append(part)
            got += part.num_rows
            if got >= rows:
                break
    if not batches:
        return Sample(None, None, limited is not None)
    table = pa.concat_tables([pa.Table.from_batches([b]) for b in batches], promote_options="permissive")
    return Sample(batches[0].schema, table, limited is not None)


async def learn_schema(connector: Connector, query: DayQuery,
                       source: SourceInfo | None = None) -> tuple[pa.Schema | None, dict[str, Any] | None]:
    """The result schema of `query` as cheaply as the connector can tell it: its `result_schema`
    (no rows read), else one row (the row limited to 1 in the warehouse where it can be), which is
    returned too. (None, None) when the query returned no row and the connector cannot tell."""
    schema = await connector.result_schema(query, source)
    if schema is not None:
        return schema, None
    sample = await read_sample(connector, query, 1, source)
    return sample.schema, sample.first_row()


def local_today(timezone: str) -> dt.date:
    return dt.datetime.now(ZoneInfo(timezone)).date()


async def newest_day_with_rows(reader: SourceQuery, today: dt.date | None = None) -> tuple[dt.date, bool]:
    """The newest day within the source's look-back (`recheck.lookback_days` days ending today
    minus `lag_days`) whose probe finds rows, newest first; (today - lag_days, False) when none."""
    src = reader.config
    newest = (today or local_today(src.timezone)) - dt.timedelta(days=src.lag_days)
    for back in range(src.recheck.lookback_days):
        day = newest - dt.timedelta(days=back)
        found = await reader.connector.probe(reader.day_query(day), reader.info)
        if found.rows > 0:
            return day, True
    return newest, False


def _plain(value: Any) -> Any:
    """A mapped value as JSON: times in ISO-8601."""
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    return value


def _mapped_rows(kind: str, batch: pa.RecordBatch) -> list[dict[str, Any]]:
    out = []
    for row in batch.to_pylist():
        shown = {k: _plain(row[k]) for k in SHOWN[kind]}
        for k in JSON_COLUMNS:
            if k in shown and isinstance(shown[k], str):
                try:
                    shown[k] = json.loads(shown[k])
                except ValueError:
                    pass
        out.append(shown)
    return out


def _map(kind: str, reader: SourceQuery, day: dt.date, table: pa.Table, rows: int) -> tuple[
        list[dict[str, Any]], Counter[str], dict[str, dict[str, Any]]]:
    """Map the sample as a load would (blocking: DuckDB); the rows, reject counts and the first
    rejected row of each reason."""
    mapper = RowMapper(kind, reader.config.mapping, reader.window(day), source=reader.source, generation=0,
                       ingested_at=dt.datetime.now(dt.UTC), max_samples=rows)
    mapped: list[dict[str, Any]] = []
    rejects: Counter[str] = Counter()
    samples: dict[str, dict[str, Any]] = {}
    try:
        for batch in table.to_batches():
            result = mapper.map(batch)
            mapped += _mapped_rows(kind, result.rows)
            rejects.update(result.rejects)
            for sample in result.samples:
                samples.setdefault(sample["reason"], sample["row"])
    finally:
        mapper.close()
    return mapped, rejects, samples


async def preview(reader: SourceQuery, day: dt.date, rows: int, *, config_file: str,
                  day_note: str = "given") -> dict[str, Any]:
    """Read the first `rows` rows of the source's day query, map them as a load would, and say
    what came out: the mapped rows, rejects by reason with a sample row each, the result's columns
    with the fields each feeds (and those unused), and the problems a load would have. Writes
    nothing. `ok` is False when a mapped column is missing or unusable, or every row read was
    rejected."""
    src, connector = reader.config, reader.connector
    query = reader.day_query(day)
    sample = await read_sample(connector, query, rows, reader.info)
    schema = sample.schema or await connector.result_schema(query, reader.info)
    findings: list[Finding] = []
    if schema is not None:
        findings = check_columns(src.kind, src.mapping, schema, filtered=not uses_placeholders(src.query),
                                 sample=sample.first_row())
    mapped: list[dict[str, Any]] = []
    rejects: Counter[str] = Counter()
    samples: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    if sample.table is not None and not any(f.missing for f in findings):
        try:
            mapped, rejects, samples = await asyncio.to_thread(_map, src.kind, reader, day, sample.table, rows)
        except IngestdError as exc:
            problems.append(str(exc))

    def where(f: Finding) -> str:
        return str(ConfigError(f"sources.{reader.source}.mapping.{f.key}", f.message, file=config_file))

    problems = [where(f) for f in findings if f.level == "error"] + problems
    rejected = sum(rejects.values())
    if sample.rows and not mapped and not problems:
        top = ", ".join(f"{reason}: {n}" for reason, n in rejects.most_common())
        problems.append(f"every row read ({sample.rows}) was rejected ({top})")
    notes = [where(f) for f in findings if f.level == "note"]
    if not sample.rows:
        notes.append(f"the query returned no row for {day}" + (
            ": its columns were checked, no row was mapped" if schema is not None else
            ", and the connector cannot tell its columns without one: nothing was checked; preview a day "
            "with rows (--day)"))
    feeds = roles(src.mapping)
    columns = [{"name": c.name, "type": c.type, "feeds": feeds.get(c.name, [])} for c in columns_of(schema)] \
        if schema is not None else []
    return {
        "source": reader.source, "kind": src.kind, "day": day.isoformat(), "day_chosen": day_note,
        "rows_asked": rows, "rows_read": sample.rows,
        "limit": "in the warehouse" if sample.pushed else "by ingestd (the connector cannot limit the query)",
        "mapped": len(mapped), "rejected": rejected,
        "columns": SHOWN[src.kind], "rows": mapped,
        "rejects": [{"reason": reason, "count": n, "sample": samples.get(reason)}
                    for reason, n in rejects.most_common()],
        "schema": columns, "unused": [c["name"] for c in columns if not c["feeds"]],
        "missing": [{"key": f"mapping.{f.key}", "column": f.column} for f in findings if f.missing],
        "problems": problems, "notes": notes,
        "ok": not problems, "truncated": False,
    }


def _cut(value: Any, limit: int) -> Any:
    if isinstance(value, str) and len(value) > limit:
        return value[:limit - 3] + "..."
    if isinstance(value, dict):
        return {k: _cut(v, limit) for k, v in value.items()}
    if isinstance(value, list):
        return [_cut(v, limit) for v in value]
    return value


def bounded(report: dict[str, Any], max_bytes: int, max_text: int = 200) -> dict[str, Any]:
    """`report` cut to at most `max_bytes` of JSON: texts in rows and samples cut to `max_text`
    characters, then rows dropped from the end, then the reject samples, then long lists of
    columns and notes; `truncated` says that something was cut."""
    out = {**report, "rows": _cut(report["rows"], max_text),
           "rejects": [{**r, "sample": _cut(r["sample"], max_text)} for r in report["rejects"]]}
    if out["rows"] != report["rows"] or out["rejects"] != report["rejects"]:
        out["truncated"] = True

    def size() -> int:
        return len(json.dumps(out, default=str).encode())

    while size() > max_bytes and out["rows"]:
        out["rows"] = out["rows"][:len(out["rows"]) // 2] if len(out["rows"]) > 8 else out["rows"][:-1]
        out["truncated"] = True
    if size() > max_bytes:
        out["rejects"] = [{**r, "sample": None} for r in out["rejects"]]
        out["truncated"] = True
    if size() > max_bytes:
        out["schema"] = out["schema"][:50]
        out["unused"] = out["unused"][:50]
        out["notes"] = [_cut(n, max_text) for n in out["notes"][:20]]
        out["problems"] = [_cut(p, 4 * max_text) for p in out["problems"][:20]]
        out["truncated"] = True
    return out


async def preview_day(reader: SourceQuery, day: dt.date | None, rows: int, *, config_file: str) -> dict[str, Any]:
    """`preview` of `day`, or by default of the newest day with rows within the source's
    look-back (its probes find it), else of today minus `lag_days`."""
    if day is not None:
        return await preview(reader, day, rows, config_file=config_file)
    day, found = await newest_day_with_rows(reader)
    note = ("the newest day with rows" if found else
            f"today - lag_days: no day of the last {reader.config.recheck.lookback_days} has rows")
    return await preview(reader, day, rows, config_file=config_file, day_note=note)
