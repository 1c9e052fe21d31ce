"""Sink type `postgres`: the analytics store in a PostgreSQL schema (tables and views in `ddl.py`).

`sample.toml` beside this module is the documented configuration: every key, its default, what
it does.

Two drivers, each for what it does best:

- **ADBC** (`adbc-driver-postgresql`) writes: each replace runs on a connection of its own, owned
  by one thread (`ingestd.ThreadSession`), as one transaction (`swap.py`): the day is bulk-loaded
  as Arrow (binary COPY) in chunks of `chunk_rows` into a temporary staging table, then swapped
  in. Memory holds one chunk, never the day; the server holds the rest, invisible until COMMIT.
- **psycopg** (async) reads and sets up: `read_generation` is one indexed read on a shared
  connection; `scan` reads through a server-side cursor in a REPEATABLE READ transaction of its
  own connection, so a replace that commits meanwhile does not mix into it.

Replaces of different partitions run concurrently (one connection each); two replaces of one
partition, in this process or another, are serialised by an advisory lock at their swap.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import pyarrow as pa

from ingestd import FencedOut, Kind, PartitionInfo, Sink, SinkError, Target, ThreadSession

from . import ddl, drivers
from .config import PostgresSinkConfig
from .swap import FenceProbe, Swap

if TYPE_CHECKING:
    import psycopg

T = TypeVar("T")


class PostgresSink(Sink):
    type_name = "postgres"
    config_model = PostgresSinkConfig

    def __init__(self, config: PostgresSinkConfig, *, name: str):
        super().__init__(config, name=name)
        self.config: PostgresSinkConfig = config
        self.schema = config.schema
        self._reader: psycopg.AsyncConnection[Any] | None = None
        self._reader_lock = asyncio.Lock()
        self._fences = FenceProbe()

    @classmethod
    def secret_values(cls, config: Any) -> list[str]:
        password = getattr(config, "password", None)
        return [password.reveal()] if password is not None else []

    # -- the Sink contract ------------------------------------------------------------------

    async def open(self) -> None:
        """Creates the schema, tables and views when one is missing. Concurrent opens (several
        daemons starting) take turns on an advisory lock; the check first lets a role without
        CREATE privileges open a schema an administrator made. A crash leaves nothing to recover:
        a replace's rows and staging table live in its transaction, which the server rolls back
        when the session dies."""
        self._fences = FenceProbe()  # learnt again after a reopen: the database may have become a state store
        async with self._guard("open"):
            con = await self._connect()
            try:
                await self._check_partitions_table(con, missing_ok=True)
                if not await self._ready(con):
                    async with con.transaction():
                        await con.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                                          (ddl.setup_lock_key(self.schema),))
                        for statement in ddl.setup_statements(self.schema):
                            await con.execute(statement)
                await self._check_partitions_table(con)
            finally:
                await con.close()

    async def replace(self, target: Target, batches: AsyncIterator[pa.RecordBatch]) -> int:
        schema = _schema_of(target.kind)
        what = f"replace {target.kind} {target.source} {target.day} with generation {target.generation}"
        session: ThreadSession[Any] = ThreadSession(self._adbc_connect, interrupt=_cancel,
                                                    name=f"postgres-sink-{self.name}")
        async with session:
            swap: Swap = await self._session_call(what, session, lambda con: Swap(con, self.schema, target,
                                                                                   self._fences))
            await self._session_call(what, session, _calling(swap.begin))
            try:
                chunk: list[pa.RecordBatch] = []
                rows = 0
                async for batch in batches:
                    batch = _conform(batch, schema, target)
                    if batch.num_rows:
                        chunk.append(batch)
                        rows += batch.num_rows
                    if rows >= self.config.chunk_rows:
                        full, chunk, rows = chunk, [], 0
                        await self._session_call(what, session, _calling(swap.stage, full))
                if chunk:
                    await self._session_call(what, session, _calling(swap.stage, chunk))
                await self._session_call(what, session, _calling(swap.commit))
            except BaseException:
                with contextlib.suppress(Exception):
                    await session.call(lambda con: swap.rollback())
                raise
            finally:
                with contextlib.suppress(Exception):
                    await session.call(lambda con: swap.close())
            return swap.staged

    async def read_generation(self, kind: Kind, source: str, day: dt.date) -> PartitionInfo | None:
        _schema_of(kind)
        async with self._guard(f"read generation of {kind} {source} {day}"):
            con = await self._reading()
            psql = drivers.psycopg().sql
            cur = await con.execute(
                psql.SQL("SELECT generation, rows FROM {}.partitions WHERE kind = %s AND source = %s AND day = %s")
                .format(psql.Identifier(self.schema)), (kind, source, day))
            row = await cur.fetchone()
        return PartitionInfo(int(row[0]), int(row[1])) if row else None

    async def scan(self, kind: Kind, source: str, day: dt.date, *,
                   batch_rows: int = 10_000) -> AsyncIterator[pa.RecordBatch]:
        """The partition's rows through a server-side cursor, `batch_rows` at a time, in a
        REPEATABLE READ transaction of a connection of its own: one snapshot from the first read
        to the last, whatever replaces commit meanwhile. The data table holds only the visible
        generation, so no join with `partitions` is needed."""
        schema = _schema_of(kind)
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
        what = f"scan {kind} {source} {day}"
        async with self._guard(what):
            con = await self._connect()
        try:
            async with self._guard(what):
                psycopg = drivers.psycopg()
                psql = psycopg.sql
                await con.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
                await con.set_read_only(True)
                await con.set_autocommit(False)
                cur = con.cursor(name="ingestd_scan")
                await cur.execute(psql.SQL("SELECT {} FROM {}.{} WHERE source = %s AND day = %s").format(
                    psql.SQL(ddl.names(kind)), psql.Identifier(self.schema), psql.Identifier(ddl.data_table(kind))),
                    (source, day))
            while True:
                async with self._guard(what):
                    rows = await cur.fetchmany(batch_rows)
                if not rows:
                    break
                yield await asyncio.to_thread(_batch, rows, schema)  # Python objects to Arrow: CPU work
        finally:
            with contextlib.suppress(Exception):
                await con.close()

    async def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            with contextlib.suppress(Exception):
                await reader.close()

    # -- connections ------------------------------------------------------------------------

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        connection: psycopg.AsyncConnection[Any] = await drivers.psycopg().AsyncConnection.connect(
            self.config.url, autocommit=True, **self.config.psycopg_kwargs())
        return connection

    async def _reading(self) -> psycopg.AsyncConnection[Any]:
        """The shared autocommit connection for `read_generation`, made again when it broke."""
        async with self._reader_lock:
            if self._reader is None or self._reader.closed or self._reader.broken:
                self._reader = await self._connect()
            return self._reader

    async def _ready(self, con: psycopg.AsyncConnection[Any]) -> bool:
        cur = await con.execute("SELECT bool_and(to_regclass(r) IS NOT NULL) FROM unnest(%s::text[]) AS r",
                                (ddl.expected_relations(self.schema),))
        row = await cur.fetchone()
        return bool(row and row[0])

    async def _check_partitions_table(self, con: psycopg.AsyncConnection[Any], *, missing_ok: bool = False) -> None:
        """Refuses a schema whose `partitions` table is not the sink's: CREATE TABLE IF NOT EXISTS
        would have kept it, and the sink would write another program's table (say, a state store
        sharing the database, pointed at by `schema`)."""
        cur = await con.execute("SELECT column_name FROM information_schema.columns "
                                "WHERE table_schema = %s AND table_name = 'partitions'", (self.schema,))
        columns = {row[0] for row in await cur.fetchall()}
        if not ddl.PARTITIONS_COLUMNS <= columns and not (missing_ok and not columns):
            raise SinkError(f"postgres sink {self.name!r} ({self.config.where()}): schema {self.schema!r} has a "
                            f"partitions table that is not this sink's (columns {', '.join(sorted(columns))}): "
                            "is it another program's schema, such as the state store's? Choose another `schema`")

    def _adbc_connect(self) -> Any:
        """An ADBC connection (autocommit off: every statement is in the replace's transaction)."""
        return drivers.adbc().connect(self.config.adbc_uri())

    # -- errors -----------------------------------------------------------------------------

    def _failure(self, what: str, exc: BaseException) -> SinkError:
        message = self.config.redact(str(exc).strip())
        return SinkError(f"postgres sink {self.name!r} ({self.config.where()}): {what} failed: {message}")

    @contextlib.asynccontextmanager
    async def _guard(self, what: str) -> AsyncIterator[None]:
        """Driver errors as `SinkError`s naming the sink, its server and the step; never the password."""
        try:
            yield
        except Exception as exc:
            if isinstance(exc, drivers.errors()):
                raise self._failure(what, exc) from None
            raise

    async def _session_call(self, what: str, session: ThreadSession[Any], work: Callable[[Any], T]) -> T:
        try:
            return await session.call(work)
        except FencedOut:
            raise
        except Exception as exc:
            if isinstance(exc, drivers.errors()):
                raise self._failure(what, exc) from None
            raise


def _calling(fn: Callable[..., T], *args: Any) -> Callable[[Any], T]:
    """`work(connection)` for `ThreadSession.call` that runs `fn(*args)` (the swap holds the connection)."""
    return lambda con: fn(*args)


def _cancel(con: Any) -> None:
    """Interrupts a running statement (the session is closing: the replace was cancelled)."""
    con.adbc_cancel()


def _schema_of(kind: str) -> pa.Schema:
    ddl.data_table(kind)
    return ddl.SCHEMAS[kind]


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


def _batch(rows: list[tuple[Any, ...]], schema: pa.Schema) -> pa.RecordBatch:
    """Rows as psycopg returns them (aware UTC datetimes, dates, str, float, int) in the canonical schema."""
    columns = list(zip(*rows, strict=True))
    return pa.RecordBatch.from_arrays([pa.array(values, field.type) for field, values in zip(schema, columns,
                                                                                             strict=True)],
                                      schema=schema)

