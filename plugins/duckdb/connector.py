"""The built-in DuckDB connector (type `duckdb`): a DuckDB file as the warehouse.

It is the embedded default: with `demo = true` the file is created with a few weeks of demo
events and metrics (see `plugins.demo_warehouse`), and each newly completed UTC day "lands"
before the next check, probe or fetch, so the daemon has something to load every day.

`sample.toml` beside this module is the documented configuration: every key, its default, what
it does.

Every call opens its own connection, read-only, and closes it when done: DuckDB allows one
writing process per file, so the connector never holds a lock between calls and a process that
writes the warehouse (a loader, a test) can do so in between. A lock held by another process is
a `TransientError` (retried); bad SQL, a missing table or file is a `PermanentError`.

The probe's fingerprint is `sum(hash(q)::HUGEINT)` over the rows of the day query: the order of
rows does not matter, a changed value (NULL included) changes it at the same count, and equal
duplicate rows do not cancel out. It depends on DuckDB's hash function, so a DuckDB upgrade
may change every fingerprint once (the re-check then reloads the days in its lookback).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import duckdb
import pyarrow as pa
import structlog

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
    rechunk,
)

from .demo_warehouse import ensure_demo_warehouse

log = structlog.get_logger("ingestd.duckdb")
T = TypeVar("T")

__all__ = ["DuckDBConfig", "DuckDBConnector", "ensure_demo_warehouse"]


@dataclass
class DuckDBConfig:
    path: Path
    demo: bool = False
    demo_days: int = 21
    demo_rows_per_day: int = 5000
    threads: int = 1

    def validate(self) -> None:
        if self.demo_days < 1:
            raise ConfigError("demo_days", "must be at least 1")
        if self.demo_rows_per_day < 1:
            raise ConfigError("demo_rows_per_day", "must be at least 1")
        if self.threads < 1:
            raise ConfigError("threads", "must be at least 1")


TRANSIENT = (duckdb.IOException, duckdb.ConnectionException, duckdb.TransactionException,
             duckdb.OutOfMemoryException, duckdb.InterruptException)

PERMANENT_WORDS = [
    (duckdb.CatalogException, "the query names a table, view or function the warehouse does not have"),
    (duckdb.ParserException, "the query is not valid SQL"),
    (duckdb.BinderException, "the query refers to a column or type it cannot use"),
    (duckdb.ConversionException, "a value could not be converted to the type the query needs"),
]


ERROR_KIND = re.compile(r"^[A-Za-z][A-Za-z ]{0,30} Error: ")


def _detail(exc: duckdb.Error) -> str:
    """DuckDB's message without its `Kind Error:` prefix and the caret drawing under the SQL."""
    lines = []
    for line in str(exc).splitlines():
        if line.startswith("LINE "):
            break
        if line.strip():
            lines.append(line.strip())
    return ERROR_KIND.sub("", " ".join(lines)) or type(exc).__name__


def translate(exc: duckdb.Error, path: Path) -> ConnectorError:
    """Sort a DuckDB error into the kernel's transient or permanent class, in plain words."""
    detail = _detail(exc)
    if isinstance(exc, TRANSIENT):
        return TransientError(f"warehouse file {path} cannot be used right now: {detail}")
    for cls, words in PERMANENT_WORDS:
        if isinstance(exc, cls):
            return PermanentError(f"{words}: {detail}")
    return PermanentError(f"the warehouse refused the query: {detail}")


class _Gate:
    """In one process DuckDB refuses a read-write connection to a file next to read-only ones,
    so the demo lander must have the file alone. Readers share it; the lander only runs when
    no reader is open (else it tries again on a later call) and readers wait while it writes,
    which takes well under a second for a day."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False

    def enter_reader(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not self._writing)
            self._readers += 1

    def leave_reader(self) -> None:
        with self._cond:
            self._readers -= 1
            self._cond.notify_all()

    def try_writer(self) -> bool:
        with self._cond:
            if self._writing or self._readers:
                return False
            self._writing = True
            return True

    def leave_writer(self) -> None:
        with self._cond:
            self._writing = False
            self._cond.notify_all()


_gates: dict[str, _Gate] = {}
_gates_lock = threading.Lock()


def _gate_for(path: Path) -> _Gate:
    with _gates_lock:
        return _gates.setdefault(str(path), _Gate())


class DuckDBConnector(Connector):
    type_name = "duckdb"
    config_model = DuckDBConfig
    capabilities = Capabilities(fingerprint=True, paramstyle="qmark", quote='"', row_limit=True)

    FINGERPRINT = "sum(hash(q)::HUGEINT)"

    def __init__(self, config: DuckDBConfig, *, name: str):
        super().__init__(config, name=name)
        self.path = Path(config.path).expanduser()
        self.clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)
        self._gate = _gate_for(self.path.resolve())
        self._landed_for: dt.date | None = None

    # -- demo ----------------------------------------------------------------------------------

    async def _land(self) -> None:
        """Demo mode: make sure every completed day is in the file (at most one try per call)."""
        if not self.config.demo:
            return
        today = self.clock().astimezone(dt.UTC).date()
        if self._landed_for == today:
            return
        if await asyncio.to_thread(self._land_blocking, today):
            self._landed_for = today

    def _land_blocking(self, today: dt.date) -> bool:
        if not self._gate.try_writer():
            return False
        try:
            days = ensure_demo_warehouse(self.path, today=today, days=self.config.demo_days,
                                         rows_per_day=self.config.demo_rows_per_day)
        except (duckdb.IOException, duckdb.ConnectionException) as exc:
            if self.path.exists():
                log.info("demo.land_deferred", connection=self.name, reason=_detail(exc))
                return False
            raise translate(exc, self.path) from exc
        except duckdb.Error as exc:
            raise translate(exc, self.path) from exc
        except OSError as exc:
            raise PermanentError(f"cannot create the demo warehouse {self.path}: {exc.strerror or exc}") from exc
        finally:
            self._gate.leave_writer()
        if days:
            log.info("demo.landed", connection=self.name, path=str(self.path), first=str(days[0]),
                     last=str(days[-1]), days=len(days))
        return True

    # -- connections ---------------------------------------------------------------------------

    def _connect(self) -> duckdb.DuckDBPyConnection:
        """A read-only connection in UTC, or a PermanentError when the file is not there."""
        if not self.path.exists():
            hint = "" if self.config.demo else " (set demo = true to create a demo warehouse there)"
            raise PermanentError(f"warehouse file {self.path} does not exist{hint}")
        con = duckdb.connect(str(self.path), read_only=True)
        try:
            con.execute("SET TimeZone = 'UTC'")
            con.execute("SET enable_progress_bar = false")
            con.execute(f"SET threads = {int(self.config.threads)}")
        except BaseException:
            con.close()
            raise
        return con

    def _session(self) -> ThreadSession[duckdb.DuckDBPyConnection]:
        """A connection of its own, as a reader of the file's gate, on a thread of its own;
        closing the session interrupts a query still running."""
        def connect() -> duckdb.DuckDBPyConnection:
            self._gate.enter_reader()
            try:
                return self._connect()
            except BaseException:
                self._gate.leave_reader()
                raise

        def close(con: duckdb.DuckDBPyConnection) -> None:
            try:
                con.close()
            finally:
                self._gate.leave_reader()

        return ThreadSession(connect, close=close, interrupt=lambda con: con.interrupt(),
                             name=f"ingestd-duckdb-{self.name}")

    async def _call(self, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """Run `work` on a connection of its own, off the event loop."""
        async with self._session() as session:
            try:
                return await session.call(work)
            except duckdb.Error as exc:
                raise translate(exc, self.path) from exc

    # -- the connector API ---------------------------------------------------------------------

    async def check(self, query: DayQuery | None = None) -> None:
        await self._land()
        if query is None:
            await self._call(lambda con: con.execute("SELECT 1").fetchall())
        else:
            await self._call(lambda con: con.execute(f"SELECT * FROM ({query.sql}) q LIMIT 0",
                                                     query.params).fetchall())

    async def probe(self, query: DayQuery, source: SourceInfo | None = None) -> ProbeResult:
        await self._land()
        sql = f"SELECT count(*), {self.FINGERPRINT} FROM ({query.sql}) q"
        rows, fp = await self._call(lambda con: con.execute(sql, query.params).fetchone())
        return ProbeResult(int(rows), format(int(fp or 0), "x"))

    async def result_schema(self, query: DayQuery, source: SourceInfo | None = None) -> pa.Schema:
        """The day query with LIMIT 0: DuckDB gives its result's Arrow schema without a row."""
        await self._land()
        sql = f"SELECT * FROM ({query.sql}) q LIMIT 0"
        table = await self._call(lambda con: con.sql(sql, params=query.params).to_arrow_table())
        return table.schema

    async def fetch(self, query: DayQuery, batch_rows: int,
                    source: SourceInfo | None = None) -> AsyncIterator[pa.RecordBatch]:
        if batch_rows < 1:
            raise ValueError("batch_rows must be at least 1")
        await self._land()
        async with self._session() as session:
            def start(con: duckdb.DuckDBPyConnection):
                reader = con.sql(query.sql, params=query.params).to_arrow_reader(batch_rows)
                session.on_close(reader.close)
                return rechunk(reader, batch_rows)

            try:
                batches = await session.call(start)
                while (batch := await session.call(lambda con: next(batches, None))) is not None:
                    yield batch
            except duckdb.Error as exc:
                raise translate(exc, self.path) from exc

    async def close(self) -> None:
        """Nothing to release: every call closes its own connection."""

