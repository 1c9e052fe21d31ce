"""Sink type `duckdb`: a DuckDB file holding the views `events` and `metrics`.

`sample.toml` beside this module is the documented configuration: every key, its default, what
it does.

Layout of the file:

- `events_data`, `metrics_data`: every stored row, in the canonical columns (`generation`
  included). A generation being written sits here, invisible, until it is switched in.
- `partitions(kind, source, day, generation, rows, loaded_at)`: the visible generation of each
  partition (`rows` is what that load wrote, kept for people; `read_generation` counts).
- `pending_writes(kind, source, day, generation, started_at)`: a journal of replaces in
  progress; what `open()` cleans after a crash.
- views `events`, `metrics`: the data rows of visible generations only. Query these.

A replace never holds a whole day in one open transaction (DuckDB keeps an open transaction's
rows in memory, about 125 MB per million event rows): it journals the write, deletes leftovers of
non-visible generations of the partition (a retry may reuse a generation number), appends the
new generation in committed chunks of `chunk_rows` rows (each chunk one INSERT, on a cursor of
the replace's own, reading the batches as they arrive, so the write overlaps the stages that
feed it), switches `partitions` to it in one short transaction, then deletes the old rows and
the journal entry together. A failure at any point leaves the previous generation visible; a
crash leaves journalled garbage that the next `open()` or replace of that partition deletes.

The file is open only while the sink works (a replace, a read, `open()`), not for the daemon's
life. DuckDB lets one process write a file and no other process read it meanwhile, so holding it
would lock analysts out for as long as the daemon runs; this way they can open it
(`duckdb -readonly analytics.duckdb`) between loads, and a load that finds their read lock waits
up to `lock_wait_seconds` for it. Closing also checkpoints, so readers get a compact file.
All DuckDB calls run on one worker thread per sink, one call at a time, so a connection is
never used by two threads; concurrent replaces of different partitions interleave safely (each
call is a whole transaction, except a replace's appends, whose open chunk is on its own cursor).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import queue
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pyarrow as pa

from ingestd import EVENTS_SCHEMA, METRICS_SCHEMA, ConfigError, Kind, PartitionInfo, Sink, SinkError, Target

T = TypeVar("T")

_TABLES = {"events": ("events_data", EVENTS_SCHEMA), "metrics": ("metrics_data", METRICS_SCHEMA)}
_CHUNK_VIEW = "_ingestd_chunk"

_DDL = [
    """CREATE TABLE IF NOT EXISTS events_data (
        source VARCHAR, day DATE, "timestamp" TIMESTAMPTZ, event_name VARCHAR, event_value VARCHAR,
        unit_id VARCHAR, id_type VARCHAR, ids VARCHAR, metadata VARCHAR, generation BIGINT,
        ingested_at TIMESTAMPTZ)""",
    """CREATE TABLE IF NOT EXISTS metrics_data (
        source VARCHAR, day DATE, unit_id VARCHAR, id_type VARCHAR, metric_name VARCHAR,
        metric_value DOUBLE, numerator DOUBLE, denominator DOUBLE, generation BIGINT,
        ingested_at TIMESTAMPTZ)""",
    """CREATE TABLE IF NOT EXISTS partitions (
        kind VARCHAR NOT NULL, source VARCHAR NOT NULL, day DATE NOT NULL, generation BIGINT NOT NULL,
        rows BIGINT NOT NULL, loaded_at TIMESTAMPTZ NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS pending_writes (
        kind VARCHAR NOT NULL, source VARCHAR NOT NULL, day DATE NOT NULL, generation BIGINT NOT NULL,
        started_at TIMESTAMPTZ NOT NULL)""",
    *(f"""CREATE OR REPLACE VIEW {kind} AS
        SELECT d.* FROM {table} AS d
        WHERE EXISTS (SELECT 1 FROM partitions AS p WHERE p.kind = '{kind}' AND p.source = d.source
                      AND p.day = d.day AND p.generation = d.generation)"""
      for kind, (table, _) in _TABLES.items()),
]

_VISIBLE = "SELECT generation FROM partitions WHERE kind = $kind AND source = $source AND day = $day"


@dataclass
class DuckDBSinkConfig:
    """`[sinks.NAME]` with `type = "duckdb"`.

    `path`: the DuckDB file (parent folders are created). `chunk_rows`: rows appended per
    committed transaction while a generation is written; it bounds the sink's memory.
    `threads`, `memory_limit` (e.g. "1GB"): DuckDB settings, its defaults when unset.
    `lock_wait_seconds`: how long a write waits for another process (an analyst) to release the
    file before the load fails.
    """

    path: Path
    chunk_rows: int = 200_000
    threads: int | None = None
    memory_limit: str | None = None
    lock_wait_seconds: float = 60.0

    def validate(self) -> None:
        if not self.path:
            raise ConfigError("path", "give the DuckDB file to write")
        if self.chunk_rows < 1:
            raise ConfigError("chunk_rows", f"expected at least 1, got {self.chunk_rows}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("threads", f"expected at least 1, got {self.threads}")
        if self.lock_wait_seconds < 0:
            raise ConfigError("lock_wait_seconds", f"expected 0 or more, got {self.lock_wait_seconds}")


class DuckDBSink(Sink):
    type_name = "duckdb"
    config_model = DuckDBSinkConfig

    def __init__(self, config: DuckDBSinkConfig, *, name: str):
        super().__init__(config, name=name)
        self.path = Path(config.path)
        self._executor: ThreadPoolExecutor | None = None
        self._con: duckdb.DuckDBPyConnection | None = None
        self._users = 0
        self._partition_locks: dict[tuple[str, str, dt.date], asyncio.Lock] = {}

    # -- the Sink contract ------------------------------------------------------------------

    async def open(self) -> None:
        async with self._session():
            await self._call("open", self._setup)

    async def replace(self, target: Target, batches: AsyncIterator[pa.RecordBatch]) -> int:
        table, schema = _table_of(target.kind)
        key = (target.kind, target.source, target.day)
        lock = self._partition_locks.setdefault(key, asyncio.Lock())
        async with lock, self._session():
            what = f"replace {target.kind} {target.source} {target.day} with generation {target.generation}"
            await self._call(what, self._start_write, target, table)
            writer = await self._call(what, self._writer, target, table, schema)
            loop = asyncio.get_running_loop()
            chunk: _Chunk | None = None
            try:
                async for batch in batches:
                    batch = _conform(batch, schema, target)
                    if not batch.num_rows:
                        continue
                    if chunk is None:  # one INSERT per chunk, reading the batches as they come
                        chunk = _Chunk(loop, schema)
                        chunk.done = asyncio.ensure_future(self._call(what, writer.insert, chunk))
                    await chunk.put(batch)
                    if chunk.rows >= self.config.chunk_rows:
                        await chunk.finish()
                        chunk = None
                if chunk is not None:
                    await chunk.finish()
                    chunk = None
                await self._call(what, self._switch, target, writer.written)
            except BaseException as exc:
                if chunk is not None:
                    with contextlib.suppress(BaseException):
                        await chunk.fail(exc)
                with contextlib.suppress(Exception):
                    await self._call(what, self._discard, target, table)
                raise
            finally:
                with contextlib.suppress(Exception):
                    await self._call(what, writer.close)
            with contextlib.suppress(SinkError):  # the new generation is visible; leftovers wait for the next open
                await self._call(what, self._discard, target, table)
            return writer.written

    async def read_generation(self, kind: Kind, source: str, day: dt.date) -> PartitionInfo | None:
        table, _ = _table_of(kind)
        async with self._session():
            return await self._call(f"read generation of {kind} {source} {day}", self._read, kind, source, day, table)

    async def scan(self, kind: Kind, source: str, day: dt.date, *,
                   batch_rows: int = 10_000) -> AsyncIterator[pa.RecordBatch]:
        """The visible generation's rows, streamed from one query on a cursor of its own: one
        statement is one snapshot, so a replace that switches generations meanwhile (on the
        sink's main connection) does not mix into it."""
        table, schema = _table_of(kind)
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
        what = f"scan {kind} {source} {day}"
        async with self._session():
            scan = await self._call(what, self._open_scan, kind, source, day, table, batch_rows)
            try:
                while (batch := await self._call(what, scan.next)) is not None:
                    for offset in range(0, batch.num_rows, batch_rows):
                        yield batch.slice(offset, batch_rows).cast(schema)
            finally:
                with contextlib.suppress(Exception):
                    await self._call(what, scan.close)

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._disconnect, True)
        finally:
            executor.shutdown(wait=False)

    # -- running DuckDB off the event loop --------------------------------------------------

    @contextlib.asynccontextmanager
    async def _session(self):
        """Keeps the file open while any operation of this sink runs; closes it (checkpointing,
        and freeing it for other processes) before the last one returns. A failure to close is
        left to the next open: the operation itself has committed."""
        self._users += 1
        try:
            yield
        finally:
            self._users -= 1
            if self._users == 0 and self._executor is not None:
                with contextlib.suppress(Exception):
                    await asyncio.get_running_loop().run_in_executor(self._executor, self._disconnect)

    async def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"duckdb-sink-{self.name}")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except (duckdb.Error, OSError) as exc:
            raise SinkError(f"duckdb sink {self.name!r} ({self.path}): {what} failed: {exc}") from exc

    def _connection(self) -> duckdb.DuckDBPyConnection:
        if self._con is not None:
            return self._con
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.config.lock_wait_seconds
        while True:
            try:
                con = duckdb.connect(str(self.path))
                break
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower() or time.monotonic() >= deadline:
                    raise
                time.sleep(0.25)
        try:
            _query(con, "SET TimeZone = 'UTC'")
            if self.config.threads:
                _query(con, "SET threads = ?", [self.config.threads])
            if self.config.memory_limit:
                _query(con, "SET memory_limit = ?", [self.config.memory_limit])
        except BaseException:
            con.close()
            raise
        self._con = con
        return con

    def _disconnect(self, force: bool = False) -> None:
        if self._con is not None and (force or self._users == 0):
            con, self._con = self._con, None
            con.close()

    # -- worker-thread steps: each one is a whole transaction -------------------------------

    def _setup(self) -> None:
        con = self._connection()
        with _transaction(con):
            for ddl in _DDL:
                _query(con, ddl)
            pending = _query(con, "SELECT DISTINCT kind, source, day FROM pending_writes")
            for kind, source, day in pending:
                if kind in _TABLES:
                    _delete_invisible(con, _TABLES[kind][0], kind, source, day)
            _query(con, "DELETE FROM pending_writes")

    def _start_write(self, target: Target, table: str) -> None:
        con = self._connection()
        key = {"kind": target.kind, "source": target.source, "day": target.day}
        with _transaction(con):
            visible = _query(con, _VISIBLE, key)
            if visible and visible[0][0] == target.generation:
                raise SinkError(f"generation {target.generation} of {target.kind} {target.source} {target.day} "
                                "is already visible: a replace must write a new generation")
            _query(con, "INSERT INTO pending_writes VALUES ($kind, $source, $day, $generation, now())",
                   {**key, "generation": target.generation})
            _delete_invisible(con, table, target.kind, target.source, target.day)

    def _writer(self, target: Target, table: str, schema: pa.Schema) -> _Writer:
        cursor = self._connection().cursor()
        try:
            _query(cursor, "SET TimeZone = 'UTC'")
        except BaseException:
            cursor.close()
            raise
        return _Writer(cursor, target, table, schema)

    def _switch(self, target: Target, rows: int) -> None:
        con = self._connection()
        key = {"kind": target.kind, "source": target.source, "day": target.day}
        with _transaction(con):
            _query(con, "DELETE FROM partitions WHERE kind = $kind AND source = $source AND day = $day", key)
            _query(con, "INSERT INTO partitions VALUES ($kind, $source, $day, $generation, $rows, now())",
                   {**key, "generation": target.generation, "rows": rows})

    def _discard(self, target: Target, table: str) -> None:
        """Deletes the partition's rows of every generation but the visible one, and its journal
        entry: after a switch, the old generation; after a failure, what the replace appended."""
        con = self._connection()
        key = {"kind": target.kind, "source": target.source, "day": target.day}
        with _transaction(con):
            _delete_invisible(con, table, target.kind, target.source, target.day)
            _query(con, "DELETE FROM pending_writes WHERE kind = $kind AND source = $source AND day = $day", key)

    def _read(self, kind: str, source: str, day: dt.date, table: str) -> PartitionInfo | None:
        con = self._connection()
        rows = _query(con, f"""
            SELECT p.generation,
                   (SELECT count(*) FROM {table} AS d
                    WHERE d.source = p.source AND d.day = p.day AND d.generation = p.generation)
            FROM partitions AS p WHERE p.kind = $kind AND p.source = $source AND p.day = $day""",
                      {"kind": kind, "source": source, "day": day})
        return PartitionInfo(int(rows[0][0]), int(rows[0][1])) if rows else None

    def _open_scan(self, kind: str, source: str, day: dt.date, table: str, batch_rows: int) -> _Scan:
        cursor = self._connection().cursor()
        try:
            _query(cursor, "SET TimeZone = 'UTC'")
            relation = cursor.sql(f"""
                SELECT d.* FROM {table} AS d JOIN partitions AS p
                  ON p.kind = $kind AND p.source = d.source AND p.day = d.day AND p.generation = d.generation
                WHERE d.source = $source AND d.day = $day""", params={"kind": kind, "source": source, "day": day})
            return _Scan(cursor, relation.to_arrow_reader(batch_rows))
        except BaseException:
            cursor.close()
            raise


class _Chunk:
    """The batches of one chunk, handed from the event loop to the INSERT that reads them on the
    sink's worker thread (as an Arrow stream): at most `DEPTH` wait, `put` waits for room."""

    DEPTH = 2
    END = object()

    def __init__(self, loop: asyncio.AbstractEventLoop, schema: pa.Schema):
        self.loop, self.schema = loop, schema
        self.queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.room = asyncio.Semaphore(self.DEPTH)
        self.rows = 0
        self.done: asyncio.Future[None] | None = None

    async def put(self, batch: pa.RecordBatch) -> None:
        assert self.done is not None
        room = asyncio.ensure_future(self.room.acquire())
        await asyncio.wait([room, self.done], return_when=asyncio.FIRST_COMPLETED)
        if not room.done():  # the INSERT ended early (it failed): its error is the one to raise
            room.cancel()
            await self.done
            raise SinkError("the chunk's INSERT ended before its batches")
        self.queue.put(batch)
        self.rows += batch.num_rows

    async def finish(self) -> None:
        """No more batches: wait for the INSERT and its commit."""
        assert self.done is not None
        self.queue.put(self.END)
        await self.done

    async def fail(self, exc: BaseException) -> None:
        """Stop the INSERT with `exc` (it rolls back) and wait for it to end."""
        assert self.done is not None
        self.queue.put(exc if isinstance(exc, Exception) else SinkError("the replace was cancelled"))
        await asyncio.shield(self.done)

    def reader(self) -> pa.RecordBatchReader:
        def batches() -> Iterator[pa.RecordBatch]:
            while (item := self.queue.get()) is not self.END:
                if isinstance(item, BaseException):
                    raise item
                self.loop.call_soon_threadsafe(self.room.release)
                assert isinstance(item, pa.RecordBatch)
                yield item

        return pa.RecordBatchReader.from_batches(self.schema, batches())


@dataclass
class _Writer:
    """Appends one replace's chunks on a cursor of its own. Each chunk is one INSERT reading its
    batches as they come (so the write overlaps the stages that feed it, and DuckDB writes the
    chunk's row groups straight to the file as one large append) and one transaction; its
    blocks are then released (`_release_written_blocks`). Methods run on the worker thread."""

    cursor: duckdb.DuckDBPyConnection
    target: Target
    table: str
    schema: pa.Schema
    written: int = 0

    def insert(self, chunk: _Chunk) -> None:
        names = self.schema.names
        columns = ", ".join(f'"{n}"' for n in names)
        select = ", ".join("CAST($generation AS BIGINT)" if n == "generation" else f'"{n}"' for n in names)
        self.cursor.register(_CHUNK_VIEW, chunk.reader())
        try:
            with _transaction(self.cursor):
                _query(self.cursor, f"INSERT INTO {self.table} ({columns}) SELECT {select} FROM {_CHUNK_VIEW}",
                       {"generation": self.target.generation})
        finally:
            self.cursor.unregister(_CHUNK_VIEW)
        self.written += chunk.rows
        _release_written_blocks(self.cursor)

    def close(self) -> None:
        self.cursor.close()


@dataclass
class _Scan:
    """A streaming result on a cursor of its own; its methods run on the sink's worker thread."""

    cursor: duckdb.DuckDBPyConnection
    reader: pa.RecordBatchReader

    def next(self) -> pa.RecordBatch | None:
        try:
            return self.reader.read_next_batch()
        except StopIteration:
            return None

    def close(self) -> None:
        try:
            self.reader.close()
        finally:
            self.cursor.close()


def _table_of(kind: str) -> tuple[str, pa.Schema]:
    try:
        return _TABLES[kind]
    except KeyError:
        raise SinkError(f"unknown kind {kind!r}: expected one of {', '.join(_TABLES)}") from None


def _conform(batch: pa.RecordBatch, schema: pa.Schema, target: Target) -> pa.RecordBatch:
    if batch.schema.equals(schema):
        return batch
    if batch.schema.names != schema.names:
        raise SinkError(f"{target.kind} batch for {target.source} {target.day} has columns "
                        f"{batch.schema.names}, expected {schema.names}")
    try:
        return batch.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise SinkError(f"{target.kind} batch for {target.source} {target.day} does not fit the "
                        f"canonical schema: {exc}") from exc


def _release_written_blocks(con: duckdb.DuckDBPyConnection) -> None:
    """Write the committed chunk to the file and drop its blocks from DuckDB's buffer pool.

    DuckDB keeps every block it writes cached until the pool reaches `memory_limit` (80 % of the
    machine's memory by default), so a replace would otherwise grow by about 18 MB per million
    event rows it writes, for nothing: the sink never reads them back. A CHECKPOINT makes the
    blocks persistent (hence evictable without a temporary file), and lowering the memory limit
    for a moment makes DuckDB evict what it can; the limit is then put back. Best effort: a pool
    that cannot shrink that far just stays as it is."""
    _query(con, "CHECKPOINT")
    limit = _query(con, "SELECT current_setting('memory_limit')")[0][0]
    with contextlib.suppress(duckdb.Error):
        _query(con, "SET memory_limit = '4MB'")
    _query(con, "SET memory_limit = ?", [limit])


def _delete_invisible(con: duckdb.DuckDBPyConnection, table: str, kind: str, source: str, day: dt.date) -> None:
    _query(con, f"DELETE FROM {table} WHERE source = $source AND day = $day "
                f"AND generation IS DISTINCT FROM ({_VISIBLE})", {"kind": kind, "source": source, "day": day})


def _query(con: duckdb.DuckDBPyConnection, sql: str, params: Any = None) -> list[tuple]:
    """Runs one statement and fetches its whole result: DuckDB refuses the next statement on a
    connection while a result is unfinished."""
    return con.execute(sql, params).fetchall() if params is not None else con.execute(sql).fetchall()


@contextlib.contextmanager
def _transaction(con: duckdb.DuckDBPyConnection):
    con.begin()
    try:
        yield
    except BaseException:
        con.rollback()
        raise
    con.commit()

