"""Connector type `files`: day partitions of Parquet or JSON Lines files in a folder laid out by date.

An ingestd plugin from a third-party package: it imports only `ingestd`, and is found through
the `ingestd` entry-point group (`files = "ingestd_files.connector"` in pyproject.toml).

    [connections.NAME]
    type = "files"

    ## The folder under which the files are laid out by date (required). Relative paths are
    ## taken from daemon.toml's folder.
    root = "/srv/lake/app_events"

    ## Where one day's files are, relative to `root` (or starting with {root}). {day:FORMAT}
    ## is the day in strftime format and may appear several times ({day} is {day:%Y-%m-%d});
    ## glob wildcards *, ?, [...] and ** (any depth) select files. Names starting with _ or .
    ## (_SUCCESS, _temporary, .part files) are skipped.
    # pattern = "dt={day:%Y-%m-%d}/*.parquet"
    ## e.g. "{root}/{day:%Y/%m/%d}/*.jsonl", "events-{day:%Y%m%d}-*.ndjson.gz"

    ## parquet | jsonl | auto: auto tells from the pattern's extension (.parquet, .pq,
    ## .jsonl, .ndjson, .json, optionally .gz or .zst).
    # format = "auto"

    ## The time zone the folder dates are in. Empty: the source's own time zone, so the
    ## folder of day D holds the source's day D. Otherwise a source day reads every folder its
    ## window touches (a source in America/New_York on UTC folders reads two), and the query's
    ## time filter keeps the day.
    # layout_timezone = ""

    ## What the probe's fingerprint covers (re-checks with detect = "checksum"):
    ## stat: path, size, mtime and inode of each file, no file is opened;
    ## content: path and SHA-256 of each file's bytes, reads every byte but parses nothing.
    # fingerprint = "stat"

    ## A marker that says a day is complete, same fields as `pattern`, e.g.
    ## "dt={day:%Y-%m-%d}/_SUCCESS". While it is missing the day probes as empty (not landed)
    ## and a fetch fails as transient. Empty: every matching file counts at once.
    # ready_marker = ""

    ## DuckDB worker threads per query.
    # threads = 1

The source's query is DuckDB SQL in which the day's files are the table `day_files` (all
files of the day, columns united by name, a column missing from a file reads as NULL):

    [sources.app_events]
    connection = "lake"
    kind = "events"
    query = "SELECT * FROM day_files"   # no placeholder: ingestd adds the mapped timestamp filter

`{day}`, `{start}` and `{end}` are bound parameters like for any connector. Folder names are
not turned into columns; use `{day}` for the day. JSON has no types: DuckDB infers them from
the first rows, so cast where it matters, e.g. `SELECT CAST(ts AS TIMESTAMP) AS ts, ...`.

Probe: `SELECT count(*) FROM (<day query>)` over the day's files. DuckDB answers a count of
Parquet files from their footers (row-group row counts and min/max statistics) whenever the
statistics prove every row of a row group passes the query's filter, so the usual case reads no
data at all; otherwise it reads only the filtered columns of the row groups it cannot decide.
JSON Lines has no footer: its probe reads the files (rows never leave DuckDB). The fingerprint
is of the files, see `fingerprint` above: a rewritten file with the same row count triggers a
reload in checksum mode. Fetch streams DuckDB's result as Arrow record batches of at most
`batch_rows` rows; memory does not grow with the size of the day.

Errors: a missing or unreadable root, bad SQL, a missing column, a file name DuckDB would read
as a glob are permanent; a file that vanishes or cannot be read while it is written (missing
footer, a torn last JSON line), a missing ready marker at fetch time are transient (retried).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import duckdb
import pyarrow as pa

from ingestd import (
    Capabilities,
    ConfigError,
    Connector,
    ConnectorError,
    DayQuery,
    PermanentError,
    ProbeResult,
    SourceInfo,
    ThreadSession,
    TransientError,
    hookimpl,
    rechunk,
)

from .layout import FileStat, LayoutError, Pattern, fingerprint, has_glob_chars, layout_days, stat_files

INGESTD_API = (2, 2)

TABLE = "day_files"
CHECK_LOOKBACK_DAYS = 31

T = TypeVar("T")

__all__ = ["FilesConfig", "FilesConnector", "TABLE", "ingestd_register"]


@dataclass
class FilesConfig:
    """`[connections.NAME]` of type `files` (see the module docstring for every key)."""

    root: Path
    pattern: str = "dt={day:%Y-%m-%d}/*.parquet"
    format: Literal["auto", "parquet", "jsonl"] = "auto"
    layout_timezone: str = ""
    fingerprint: Literal["stat", "content"] = "stat"
    ready_marker: str = ""
    threads: int = 1

    def validate(self) -> None:
        try:
            pattern = Pattern(self.pattern, Path(self.root))
        except LayoutError as exc:
            raise ConfigError("pattern", str(exc)) from None
        if self.format == "auto" and pattern.suffix_format() is None:
            raise ConfigError("format", f"cannot tell the format from the pattern {self.pattern!r}: "
                                        "set format = \"parquet\" or \"jsonl\"")
        if self.ready_marker:
            try:
                Pattern(self.ready_marker, Path(self.root))
            except LayoutError as exc:
                raise ConfigError("ready_marker", str(exc)) from None
        if self.layout_timezone:
            try:
                ZoneInfo(self.layout_timezone)
            except (ZoneInfoNotFoundError, ValueError):
                raise ConfigError("layout_timezone", f"unknown IANA time zone {self.layout_timezone!r}") from None
        if self.threads < 1:
            raise ConfigError("threads", "must be at least 1")

    @property
    def file_format(self) -> str:
        if self.format != "auto":
            return self.format
        return Pattern(self.pattern, Path(self.root)).suffix_format() or "parquet"


# -- errors ------------------------------------------------------------------------------------

TRANSIENT = (duckdb.IOException, duckdb.InvalidInputException, duckdb.InterruptException,
             duckdb.OutOfMemoryException, duckdb.TransactionException)

PERMANENT_WORDS = [
    (duckdb.CatalogException, f"the query names a table or function that does not exist (the files are table {TABLE})"),
    (duckdb.ParserException, "the query is not valid DuckDB SQL"),
    (duckdb.BinderException, "the query refers to a column or type the files do not have"),
    (duckdb.ConversionException, "a value could not be converted to the type the query needs"),
]


def _detail(exc: BaseException) -> str:
    lines = []
    for line in str(exc).splitlines():
        if line.startswith("LINE "):
            break
        if line.strip():
            lines.append(line.strip())
    return " ".join(lines) or type(exc).__name__


def translate(exc: duckdb.Error) -> ConnectorError:
    """Sort a DuckDB error into the kernel's transient or permanent class."""
    detail = _detail(exc)
    if isinstance(exc, TRANSIENT):
        return TransientError(f"the files cannot be read right now (being written or replaced?): {detail}")
    for cls, words in PERMANENT_WORDS:
        if isinstance(exc, cls):
            return PermanentError(f"{words}: {detail}")
    return PermanentError(f"DuckDB refused the query: {detail}")


def _os_error(exc: OSError, what: str) -> ConnectorError:
    text = f"{what}: {exc.strerror or exc}"
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, PermissionError)):
        return PermanentError(text)
    return TransientError(text)


# -- one DuckDB connection over the day's files ------------------------------------------------

def _connect(files: list[str], file_format: str, threads: int) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the view `day_files` over `files`."""
    con = duckdb.connect(":memory:", config={"threads": threads})
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.execute("SET enable_progress_bar = false")
        if file_format == "parquet":
            rel = con.read_parquet(files, union_by_name=True, hive_partitioning=False)
        else:
            rel = con.read_json(files, format="newline_delimited", union_by_name=True, hive_partitioning=False)
        rel.to_view(TABLE)
    except BaseException:
        con.close()
        raise
    return con


# -- the connector -----------------------------------------------------------------------------

class FilesConnector(Connector):
    type_name = "files"
    config_model = FilesConfig
    capabilities = Capabilities(fingerprint=True, paramstyle="qmark", quote='"', row_limit=True)

    def __init__(self, config: FilesConfig, *, name: str):
        super().__init__(config, name=name)
        self.root = Path(config.root).expanduser()
        self.pattern = Pattern(config.pattern, self.root)
        self.marker = Pattern(config.ready_marker, self.root) if config.ready_marker else None
        self.file_format = config.file_format

    # -- files -----------------------------------------------------------------------------

    def _check_root(self) -> None:
        try:
            if not self.root.is_dir():
                what = "is not a folder" if self.root.exists() else "does not exist"
                raise PermanentError(f"root {self.root} {what}")
            os.scandir(self.root).close()  # readable, without listing a large root
        except OSError as exc:
            raise _os_error(exc, f"cannot list root {self.root}") from exc

    def days_of(self, query: DayQuery) -> list[dt.date]:
        w = query.window
        return layout_days(w.day, w.start, w.end, w.timezone, self.config.layout_timezone)

    def is_ready(self, days: list[dt.date]) -> bool:
        return self.marker is None or all(self.marker.exists(d) for d in days)

    def list_files(self, days: list[dt.date]) -> list[FileStat]:
        """The data files of these layout days, stat'ed; raises the kernel's errors."""
        self._check_root()
        paths: dict[str, None] = {}
        try:
            for day in days:
                paths.update(dict.fromkeys(self.pattern.files(day)))
            files = stat_files(list(paths))
        except FileNotFoundError as exc:
            raise TransientError(f"a file vanished while the day was listed: {exc.filename}") from exc
        except OSError as exc:
            raise _os_error(exc, f"cannot list the files under {self.root}") from exc
        for f in files:
            if has_glob_chars(f.path):
                raise PermanentError(f"file {f.path} has *, ? or [ in its path, which DuckDB reads as a glob; "
                                     "rename it or move the root")
        return files

    def _session(self, files: list[FileStat]) -> ThreadSession[duckdb.DuckDBPyConnection]:
        """An in-memory DuckDB over `files` on a thread of its own; closing the session interrupts
        a query still running (a cancelled fetch must not leave one behind)."""
        connect = functools.partial(_connect, [f.path for f in files], self.file_format, self.config.threads)
        return ThreadSession(connect, interrupt=lambda con: con.interrupt(), name=f"ingestd-files-{self.name}")

    async def _call(self, files: list[FileStat], work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        async with self._session(files) as session:
            try:
                return await session.call(work)
            except duckdb.Error as exc:
                raise translate(exc) from exc

    # -- the connector API -----------------------------------------------------------------

    async def check(self, query: DayQuery | None = None) -> None:
        """The root can be listed; given a day query, it binds against that day's files, or
        against the newest files of the 31 days before it when the day has none yet (a query
        with nothing to bind against passes)."""
        await asyncio.to_thread(self._check_root)
        if query is None:
            return
        days = self.days_of(query)
        for back in range(CHECK_LOOKBACK_DAYS + 1):
            shifted = [d - dt.timedelta(days=back) for d in days]
            files = await asyncio.to_thread(self.list_files, shifted)
            if files:
                sql = f"SELECT * FROM ({query.sql}) q LIMIT 0"
                await self._call(files, lambda con, sql=sql: con.execute(sql, query.params).fetchall())
                return

    async def result_schema(self, query: DayQuery, source: SourceInfo | None = None) -> pa.Schema | None:
        """The day query over the day's files with LIMIT 0: DuckDB gives the result's schema
        without reading a row (a Parquet footer, the first rows of JSON Lines for their types).
        None for a day without files: another day's files could say other types."""
        files = await asyncio.to_thread(self.list_files, self.days_of(query))
        if not files:
            return None
        sql = f"SELECT * FROM ({query.sql}) q LIMIT 0"
        table = await self._call(files, lambda con: con.sql(sql, params=query.params).to_arrow_table())
        return table.schema

    async def probe(self, query: DayQuery, source: SourceInfo | None = None) -> ProbeResult:
        days = self.days_of(query)
        mode = self.config.fingerprint

        def look() -> tuple[list[FileStat], str | None]:
            files = self.list_files(days) if self.is_ready(days) else []
            try:
                return files, fingerprint(files, self.root, mode)
            except FileNotFoundError as exc:
                raise TransientError(f"a file vanished while it was read: {exc.filename}") from exc
            except OSError as exc:
                raise _os_error(exc, "cannot read a file for its fingerprint") from exc

        files, fp = await asyncio.to_thread(look)
        if not files:
            return ProbeResult(0, fp)
        sql = f"SELECT count(*) FROM ({query.sql}) q"
        (rows,) = await self._call(files, lambda con: con.execute(sql, query.params).fetchone())
        return ProbeResult(int(rows), fp)

    async def fetch(self, query: DayQuery, batch_rows: int,
                    source: SourceInfo | None = None) -> AsyncIterator[pa.RecordBatch]:
        if batch_rows < 1:
            raise ValueError("batch_rows must be at least 1")
        days = self.days_of(query)
        if not await asyncio.to_thread(self.is_ready, days):
            raise TransientError(f"the ready marker of {query.window.day} is missing (the day is being rewritten?)")
        files = await asyncio.to_thread(self.list_files, days)
        if not files:
            return
        sql = f"SELECT * FROM ({query.sql}) q"
        async with self._session(files) as session:
            def start(con: duckdb.DuckDBPyConnection):
                reader = con.sql(sql, params=query.params).to_arrow_reader(batch_rows)
                session.on_close(reader.close)
                return rechunk(reader, batch_rows)

            try:
                batches = await session.call(start)
                while (batch := await session.call(lambda con: next(batches, None))) is not None:
                    yield batch
            except duckdb.Error as exc:
                raise translate(exc) from exc

    async def close(self) -> None:
        """Nothing to release: every call opens and closes its own in-memory DuckDB."""


@hookimpl
def ingestd_register(registry):
    registry.add_connector(FilesConnector)
