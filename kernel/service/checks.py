"""`ingestd check` and `ingestd preview` without a daemon: each source's connection proven to
work and to read the source's day query, the query's columns checked against the mapping, each
sink opened; a preview read through a connector of its own. Neither uses the state store (a
daemon may be running) nor writes anything but what opening a sink creates."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from ..core.columns import NUMERIC, Finding, check_columns, columns_of
from ..core.config import Config, SourceSection
from ..core.contracts import Connector
from ..core.errors import ConfigError, IngestdError
from ..core.query import DayQuery, uses_placeholders
from ..engine.job import SourceQuery
from ..engine.preview import learn_schema, local_today, newest_day_with_rows, preview_day, read_sample
from ..plugin.manager import LoadedPlugins


@dataclass(frozen=True)
class SourceCheck:
    source: str
    connection: str
    connection_type: str
    error: str | None = None
    day: dt.date | None = None
    problems: list[str] = field(default_factory=list)
    """What is wrong with the mapping against the query's result, each naming its key."""
    notes: list[str] = field(default_factory=list)
    """What is allowed but worth saying (a text timestamp, what could not be verified)."""
    columns: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and not self.problems


@dataclass(frozen=True)
class SinkCheck:
    sink: str
    sink_type: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@contextlib.asynccontextmanager
async def _connectors(config: Config, plugins: LoadedPlugins) -> AsyncIterator[Callable[[str], Connector]]:
    """The connector of a connection, made on first use; all closed at the end."""
    made: dict[str, Connector] = {}

    def connector(name: str) -> Connector:
        if name not in made:
            plugged = config.connections[name]
            made[name] = plugins.registry.connectors[plugged.type](plugged.config, name=name)
        return made[name]

    try:
        yield connector
    finally:
        for conn in made.values():
            with contextlib.suppress(Exception):
                await conn.close()


def _where(config: Config, source: str, f: Finding) -> str:
    return str(ConfigError(f"sources.{source}.mapping.{f.key}", f.message, file=str(config.file)))


async def _findings(src: SourceSection, conn: Connector, query: DayQuery, reader: SourceQuery) -> tuple[
        list[Finding] | None, int | None]:
    """The mapping against the result schema of `query` (None when it cannot be learnt); an epoch
    timestamp column gets one row read to say what unit its values look like."""
    schema, row = await learn_schema(conn, query, reader.info)
    if schema is None:
        return None, None
    filtered = not uses_placeholders(src.query)
    findings = check_columns(src.kind, src.mapping, schema, filtered=filtered, sample=row)
    epoch = [c for c in columns_of(schema) if c.name == src.mapping.timestamp and c.family in NUMERIC]
    if row is None and epoch and not src.mapping.timestamp_unit:
        row = (await read_sample(conn, query, 1, reader.info)).first_row()
        findings = check_columns(src.kind, src.mapping, schema, filtered=filtered, sample=row)
    return findings, len(schema)


async def _diagnose(src: SourceSection, conn: Connector, query: DayQuery, reader: SourceQuery) -> list[Finding]:
    """A query without placeholders is filtered on the mapped timestamp or date column, which fails
    in the warehouse when that column has the wrong type: the columns of the unfiltered query
    (one row, or none) say which mapping key is wrong. Empty when they cannot be learnt."""
    if uses_placeholders(src.query):
        return []
    sql = src.query.strip().rstrip(";").strip()
    named = conn.capabilities.paramstyle in ("pyformat", "named", "at")
    if conn.capabilities.paramstyle in ("format", "pyformat"):
        sql = sql.replace("%", "%%")
    bare = DayQuery(sql, {} if named else [], query.window)
    try:
        findings, _ = await _findings(src, conn, bare, reader)
    except IngestdError:
        return []
    return [f for f in findings or [] if f.level == "error"]


async def check_source(config: Config, name: str, conn: Connector) -> SourceCheck:
    """One source: the connector's `check()` with the day query of today minus `lag_days`, then
    the query's result columns (a zero-row or one-row read; of the newest day with rows in the
    look-back when that day has none) against the mapping."""
    src = config.sources[name]
    plugged = config.connections[src.connection]
    reader = SourceQuery(name, src, conn)
    day = local_today(src.timezone) - dt.timedelta(days=src.lag_days)
    query = reader.day_query(day)

    def result(**kw: Any) -> SourceCheck:
        return SourceCheck(name, src.connection, plugged.type, day=day, **kw)

    try:
        await conn.check(query)
    except IngestdError as exc:
        wrong = await _diagnose(src, conn, query, reader)
        return result(error=str(exc), problems=[_where(config, name, f) for f in wrong])
    notes = []
    try:
        findings, width = await _findings(src, conn, query, reader)
        if findings is None:
            newest, found = await newest_day_with_rows(reader)
            if found:
                day, query = newest, reader.day_query(newest)
                findings, width = await _findings(src, conn, query, reader)
    except IngestdError as exc:
        return result(error=str(exc))
    if findings is None:
        notes.append(f"no day of the last {src.recheck.lookback_days} has rows, and connection "
                     f"{src.connection!r} cannot tell the query's columns without one: the mapped columns were "
                     "not verified")
        findings = []
    return result(problems=[_where(config, name, f) for f in findings if f.level == "error"],
                  notes=notes + [_where(config, name, f) for f in findings if f.level == "note"], columns=width)


async def check_sources(config: Config, plugins: LoadedPlugins) -> list[SourceCheck]:
    """Every source's `check_source`, one connector per connection."""
    async with _connectors(config, plugins) as connectors:
        return [await check_source(config, name, connectors(src.connection))
                for name, src in config.sources.items()]


async def check_sinks(config: Config, plugins: LoadedPlugins) -> list[SinkCheck]:
    """Open and close each sink, as the daemon opens them at start."""
    out = []
    for name, plugged in config.sinks.items():
        sink = plugins.registry.sinks[plugged.type](plugged.config, name=name)
        try:
            await sink.open()
            out.append(SinkCheck(name, plugged.type))
        except Exception as exc:  # any failure of a plugin's open is the sink's line, not a crash
            out.append(SinkCheck(name, plugged.type, str(exc) or type(exc).__name__))
        finally:
            with contextlib.suppress(Exception):
                await sink.close()
    return out


async def preview_source(config: Config, plugins: LoadedPlugins, source: str, day: dt.date | None,
                         rows: int) -> dict[str, Any]:
    """`ingestd preview`: the source previewed through a connector of its own (see
    `ingestd.engine.preview.preview_day`); writes nothing."""
    async with _connectors(config, plugins) as connectors:
        src = config.sources[source]
        reader = SourceQuery(source, src, connectors(src.connection))
        return await preview_day(reader, day, rows, config_file=str(config.file))
