"""Sink type `sqlite`: an SQLite file (WAL mode) with tables `events`, `metrics` and `partitions`.

`sample.toml` beside this module is the documented configuration: every key, its default, what
it does.

Each replace is one write transaction: delete the partition's rows, insert the new generation
batch by batch, record it in `partitions(kind, source, day, generation, rows, loaded_at)`, commit.
SQLite keeps the pending rows in its page cache and spills them to the WAL file, not to memory,
so a large day is fine; readers keep seeing the last committed generation meanwhile (WAL), and a
crash rolls the transaction back by itself, leaving nothing to clean.

SQLite has one writer, so replaces in this process are queued behind each other. Reads use their
own connection, so they never see a replace half way. The file stays open for the daemon's life:
WAL lets other processes read it at any time.

Values: timestamps as ISO-8601 UTC text with microseconds (`2026-11-20T13:45:00.000000Z`, which
sorts in time order and SQLite's date functions read), days as `YYYY-MM-DD`, `ids` and
`metadata` as JSON text.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import sqlite3
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from ingestd import EVENTS_SCHEMA, METRICS_SCHEMA, ConfigError, Kind, PartitionInfo, Sink, SinkError, Target

T = TypeVar("T")

_SCHEMAS = {"events": EVENTS_SCHEMA, "metrics": METRICS_SCHEMA}

_DDL = [
    """CREATE TABLE IF NOT EXISTS events (
        source TEXT NOT NULL, day TEXT NOT NULL, "timestamp" TEXT, event_name TEXT, event_value TEXT,
        unit_id TEXT, id_type TEXT, ids TEXT, metadata TEXT, generation INTEGER NOT NULL, ingested_at TEXT)""",
    "CREATE INDEX IF NOT EXISTS events_partition ON events (source, day)",
    """CREATE TABLE IF NOT EXISTS metrics (
        source TEXT NOT NULL, day TEXT NOT NULL, unit_id TEXT, id_type TEXT, metric_name TEXT,
        metric_value REAL, numerator REAL, denominator REAL, generation INTEGER NOT NULL, ingested_at TEXT)""",
    "CREATE INDEX IF NOT EXISTS metrics_partition ON metrics (source, day)",
    """CREATE TABLE IF NOT EXISTS partitions (
        kind TEXT NOT NULL, source TEXT NOT NULL, day TEXT NOT NULL, generation INTEGER NOT NULL,
        rows INTEGER NOT NULL, loaded_at TEXT NOT NULL, PRIMARY KEY (kind, source, day))""",
]

_TS_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # %S carries the microseconds of a timestamp[us]


@dataclass
class SQLiteSinkConfig:
    """`[sinks.NAME]` with `type = "sqlite"`.

    `path`: the SQLite file (parent folders are created). `busy_timeout_seconds`: how long a
    write waits for another process's write lock before the load fails.
    """

    path: Path
    busy_timeout_seconds: float = 60.0

    def validate(self) -> None:
        if not self.path:
            raise ConfigError("path", "give the SQLite file to write")
        if self.busy_timeout_seconds < 0:
            raise ConfigError("busy_timeout_seconds", f"expected 0 or more, got {self.busy_timeout_seconds}")


class SQLiteSink(Sink):
    type_name = "sqlite"
    config_model = SQLiteSinkConfig

    def __init__(self, config: SQLiteSinkConfig, *, name: str):
        super().__init__(config, name=name)
        self.path = Path(config.path)
        self._executor: ThreadPoolExecutor | None = None
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._write_lock = asyncio.Lock()

    async def open(self) -> None:
        await self._call("open", self._setup)

    async def replace(self, target: Target, batches: AsyncIterator[pa.RecordBatch]) -> int:
        schema = _schema_of(target.kind)
        what = f"replace {target.kind} {target.source} {target.day} with generation {target.generation}"
        async with self._write_lock:
            await self._call(what, self._begin, target)
            written = 0
            try:
                async for batch in batches:
                    if batch.num_rows:
                        written += await self._call(what, self._insert, target, schema, batch)
                await self._call(what, self._commit, target, written)
            except BaseException:
                with contextlib.suppress(Exception):
                    await self._call(what, self._rollback)
                raise
            return written

    async def read_generation(self, kind: Kind, source: str, day: dt.date) -> PartitionInfo | None:
        _schema_of(kind)
        return await self._call(f"read generation of {kind} {source} {day}", self._read, kind, source, day)

    async def scan(self, kind: Kind, source: str, day: dt.date, *,
                   batch_rows: int = 10_000) -> AsyncIterator[pa.RecordBatch]:
        """The visible generation's rows, read in one transaction on a connection of its own:
        WAL gives it the snapshot of its first read, whatever replaces commit meanwhile (a
        statement on the shared reader connection would pin that connection's snapshot too)."""
        schema = _schema_of(kind)
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
        what = f"scan {kind} {source} {day}"
        scan = await self._call(what, self._open_scan, kind, source, day)
        try:
            while rows := await self._call(what, scan.fetchmany, batch_rows):
                yield _batch(rows, schema)
        finally:
            with contextlib.suppress(Exception):
                await self._call(what, _close_scan, scan)

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._disconnect)
        finally:
            executor.shutdown(wait=False)

    # -- off the event loop: one worker thread owns both connections -----------------------

    async def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"sqlite-sink-{self.name}")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except (sqlite3.Error, OSError) as exc:
            raise SinkError(f"sqlite sink {self.name!r} ({self.path}): {what} failed: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.path, timeout=self.config.busy_timeout_seconds, isolation_level=None,
                              check_same_thread=False)
        con.execute("PRAGMA journal_mode = WAL")
        con.execute("PRAGMA synchronous = FULL")
        return con

    def _connections(self) -> tuple[sqlite3.Connection, sqlite3.Connection]:
        if self._writer is None:
            self._writer = self._connect()
            for ddl in _DDL:
                self._writer.execute(ddl)
        if self._reader is None:
            self._reader = self._connect()
        return self._writer, self._reader

    def _disconnect(self) -> None:
        for attr in ("_writer", "_reader"):
            con = getattr(self, attr)
            setattr(self, attr, None)
            if con is not None:
                with contextlib.suppress(sqlite3.Error):
                    if con.in_transaction:
                        con.rollback()
                con.close()

    def _setup(self) -> None:
        self._connections()

    def _begin(self, target: Target) -> None:
        con, _ = self._connections()
        con.execute("BEGIN IMMEDIATE")
        try:
            visible = con.execute("SELECT generation FROM partitions WHERE kind = ? AND source = ? AND day = ?",
                                  (target.kind, target.source, target.day.isoformat())).fetchone()
            if visible and visible[0] == target.generation:
                raise SinkError(f"generation {target.generation} of {target.kind} {target.source} {target.day} "
                                "is already visible: a replace must write a new generation")
            con.execute(f"DELETE FROM {target.kind} WHERE source = ? AND day = ?",
                        (target.source, target.day.isoformat()))
        except BaseException:
            con.rollback()
            raise

    def _insert(self, target: Target, schema: pa.Schema, batch: pa.RecordBatch) -> int:
        con, _ = self._connections()
        columns = _columns(batch, schema, target)
        names = ", ".join(f'"{n}"' for n in schema.names)
        marks = ", ".join("?" for _ in schema.names)
        con.executemany(f"INSERT INTO {target.kind} ({names}) VALUES ({marks})", zip(*columns, strict=True))
        return batch.num_rows

    def _commit(self, target: Target, rows: int) -> None:
        con, _ = self._connections()
        con.execute(
            "INSERT OR REPLACE INTO partitions VALUES (?, ?, ?, ?, ?, ?)",
            (target.kind, target.source, target.day.isoformat(), target.generation, rows,
             dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")))
        con.commit()

    def _rollback(self) -> None:
        if self._writer is not None and self._writer.in_transaction:
            self._writer.rollback()

    def _read(self, kind: str, source: str, day: dt.date) -> PartitionInfo | None:
        _, con = self._connections()
        row = con.execute(
            f"""SELECT p.generation,
                       (SELECT count(*) FROM {kind} AS d WHERE d.source = p.source AND d.day = p.day)
                FROM partitions AS p WHERE p.kind = ? AND p.source = ? AND p.day = ?""",
            (kind, source, day.isoformat())).fetchone()
        return PartitionInfo(int(row[0]), int(row[1])) if row else None

    def _open_scan(self, kind: str, source: str, day: dt.date) -> sqlite3.Cursor:
        con = self._connect()
        try:
            con.execute("BEGIN")
            names = ", ".join(f'"{n}"' for n in _SCHEMAS[kind].names)
            # the visible generation is read inside the same transaction as its rows
            return con.execute(
                f"""SELECT {names} FROM {kind} WHERE source = ? AND day = ? AND generation =
                    (SELECT generation FROM partitions WHERE kind = ? AND source = ? AND day = ?)""",
                (source, day.isoformat(), kind, source, day.isoformat()))
        except BaseException:
            con.close()
            raise


def _close_scan(cursor: sqlite3.Cursor) -> None:
    con = cursor.connection
    try:
        cursor.close()
        con.rollback()
    finally:
        con.close()


def _batch(rows: list[tuple], schema: pa.Schema) -> pa.RecordBatch:
    """Rows as SQLite stores them (ISO text for days and timestamps) in the canonical schema."""
    columns = list(zip(*rows, strict=True))
    arrays = []
    for field, values in zip(schema, columns, strict=False):  # no rows: no columns
        if pa.types.is_timestamp(field.type) or pa.types.is_date(field.type):
            arrays.append(pa.array(values, pa.string()).cast(field.type))
        else:
            arrays.append(pa.array(values, field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _schema_of(kind: str) -> pa.Schema:
    try:
        return _SCHEMAS[kind]
    except KeyError:
        raise SinkError(f"unknown kind {kind!r}: expected one of {', '.join(_SCHEMAS)}") from None


def _columns(batch: pa.RecordBatch, schema: pa.Schema, target: Target) -> list[list[Any]]:
    """The batch as Python column lists in SQLite's types, `generation` set to the target's."""
    if batch.schema.names != schema.names:
        raise SinkError(f"{target.kind} batch for {target.source} {target.day} has columns "
                        f"{batch.schema.names}, expected {schema.names}")
    out = []
    for field in schema:
        col = batch.column(field.name)
        if field.name == "generation":
            out.append([target.generation] * batch.num_rows)
            continue
        try:
            col = col.cast(field.type)
            if pa.types.is_timestamp(field.type):
                col = pc.strftime(col, format=_TS_FORMAT)
            elif pa.types.is_date(field.type):
                col = col.cast(pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise SinkError(f"{target.kind} column {field.name} for {target.source} {target.day} does not "
                            f"fit the canonical type {field.type}: {exc}") from exc
        out.append(col.to_pylist())
    return out

