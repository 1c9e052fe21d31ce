"""The two databases a state store lives in: a SQLite file (one writer, the default) and a
PostgreSQL schema (several replicas). The store's SQL is written once, with `?` placeholders and
the `$`-tokens of `QUERY_TOKENS` where the dialects differ; a backend renders it, runs it, and
hands back `Row`s. Neither blocks the event loop: aiosqlite runs SQLite in a thread, psycopg's
async connection waits on its socket.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any, ClassVar, Protocol
from urllib.parse import urlsplit, urlunsplit

import aiosqlite

from ...core import logs
from ...core.errors import StateError
from ...core.secrets import scrub
from . import schema
from .lock import StateLock
from .rows import Row

log = logs.get("ingestd.state")

_STRFTIME = "strftime('%Y-%m-%d %H:%M:%f', 'now'"
QUERY_TOKENS: dict[str, dict[str, str]] = {
    "sqlite": {"$NOW": _STRFTIME + ")", "$EXPIRES": _STRFTIME + ", '+' || ? || ' seconds')",
               "$AGO": _STRFTIME + ", '-' || ? || ' seconds')", "$FOR_UPDATE": "", "$SKIP_LOCKED": ""},
    "postgres": {"$NOW": "now()", "$EXPIRES": "(now() + make_interval(secs => ?))",
                 "$AGO": "(now() - make_interval(secs => ?))", "$FOR_UPDATE": " FOR UPDATE",
                 "$SKIP_LOCKED": " FOR UPDATE SKIP LOCKED"},
}
"""`$NOW`, the database's clock; `$EXPIRES`/`$AGO`, that clock plus/minus a parameter's seconds
(always a float); `$FOR_UPDATE`/`$SKIP_LOCKED`, row locks (SQLite's writer lock covers them).
On PostgreSQL lease expiries use its clock, so the replicas' clocks do not matter."""

META = [
    "INSERT INTO meta (key, value) VALUES ('schema_version', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    "INSERT INTO meta (key, value) VALUES ('store_id', ?) ON CONFLICT (key) DO NOTHING",
]


class Result:
    def __init__(self, rows: list[Row], rowcount: int):
        self.rows = rows
        self.rowcount = rowcount

    def fetchone(self) -> Row | None:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[Row]:
        return self.rows


class Conn(Protocol):
    """An open transaction's connection."""

    async def execute(self, sql: str, params: Iterable[Any] = ()) -> Result: ...

    async def executemany(self, sql: str, rows: Iterable[Iterable[Any]]) -> None: ...


class Backend(ABC):
    dialect: ClassVar[str]
    shared: ClassVar[bool]
    """Whether several replicas may write at once (PostgreSQL); a SQLite file has one writer."""

    where: str
    """How errors name the store (never with a password)."""

    def __init__(self) -> None:
        self._rendered: dict[str, str] = {}
        self.store_id = ""

    def sql(self, text: str) -> str:
        """`text` in this backend's dialect and placeholder style."""
        out = self._rendered.get(text)
        if out is None:
            out = text
            for token, spelled in QUERY_TOKENS[self.dialect].items():
                out = out.replace(token, spelled)
            out = self._rendered[text] = self._placeholders(out)
        return out

    def _placeholders(self, text: str) -> str:
        return text

    @abstractmethod
    async def open(self, writer: bool) -> None:
        """Connect; a writer creates or migrates the schema, a reader only checks it is there."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def fetch(self, sql: str, params: Iterable[Any] = ()) -> list[Row]:
        """Rows of one read outside any transaction (it sees what committed before it)."""

    @abstractmethod
    def transaction(self) -> contextlib.AbstractAsyncContextManager[Conn]:
        """One write transaction: committed when the block ends, rolled back when it raises."""

    def is_missing_table(self, exc: BaseException) -> bool:
        return False

    async def _read_store_id(self) -> None:
        rows = await self.fetch("SELECT value FROM meta WHERE key = 'store_id'")
        self.store_id = rows[0][0] if rows else ""


# -- SQLite ------------------------------------------------------------------------------------


class _SqliteConn:
    def __init__(self, db: aiosqlite.Connection, backend: Backend):
        self._db = db
        self._backend = backend

    async def execute(self, sql: str, params: Iterable[Any] = ()) -> Result:
        cur = await self._db.execute(self._backend.sql(sql), tuple(params))
        rows = await cur.fetchall()
        names = tuple(d[0] for d in cur.description or ())
        return Result([Row(names, r) for r in rows], cur.rowcount)

    async def executemany(self, sql: str, rows: Iterable[Iterable[Any]]) -> None:
        await self._db.executemany(self._backend.sql(sql), [tuple(r) for r in rows])


ADD_COLUMN = re.compile(r"^ALTER TABLE (\w+) ADD COLUMN (\w+)", re.IGNORECASE)


class SqliteBackend(Backend):
    """One SQLite file in WAL mode through one aiosqlite connection. A writer takes the lock file
    beside it (`exclusive`; only tests that play several replicas on one file go without)."""

    dialect = "sqlite"
    shared = False

    def __init__(self, path: Path, *, exclusive: bool = True):
        super().__init__()
        self.path = Path(path)
        self.where = f"state database {self.path}"
        self._exclusive = exclusive
        self._db: aiosqlite.Connection | None = None
        self._lock: StateLock | None = None

    async def open(self, writer: bool) -> None:
        if not writer and not self.path.exists():
            raise StateError(f"no state database at {self.path} (has the daemon run yet?)")
        if writer and self._exclusive:
            self._lock = StateLock(self.path)
            self._lock.acquire()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = await aiosqlite.connect(self.path, timeout=5.0, isolation_level=None)
            await self._db.execute("PRAGMA busy_timeout = 5000")
            check = await self.fetch("PRAGMA quick_check")
            if not check or check[0][0] != "ok":
                raise StateError(f"state database {self.path} is corrupt ({check[0][0] if check else '?'}); it was "
                                 f"not reset: restore it from a backup or move it away to start afresh")
            if writer:
                await self._db.execute("PRAGMA journal_mode = WAL")
                await self._db.execute("PRAGMA synchronous = NORMAL")
                await self._migrate()
            await self._read_store_id_if_any()
        except sqlite3.DatabaseError as exc:
            await self.close()
            raise StateError(f"state database {self.path} cannot be used: {exc} (it was not reset: restore it "
                             f"from a backup or move it away to start afresh)") from exc
        except BaseException:
            await self.close()
            raise

    async def _read_store_id_if_any(self) -> None:
        if await self.fetch("SELECT 1 FROM sqlite_master WHERE name = 'meta'"):
            await self._read_store_id()

    async def _migrate(self) -> None:
        version = (await self.fetch("PRAGMA user_version"))[0][0]
        if version > schema.SCHEMA_VERSION:
            raise StateError(f"state database {self.path} has schema version {version}, newer than "
                             f"this ingestd's {schema.SCHEMA_VERSION}")
        async with self.transaction() as tx:
            fresh = not (await tx.execute("SELECT 1 FROM sqlite_master WHERE name = 'runs'")).rows
            for statement in schema.steps(version, fresh, self.dialect):
                added = ADD_COLUMN.match(statement)
                if added and any(c[1] == added[2] for c in (await tx.execute(f"PRAGMA table_info({added[1]})")).rows):
                    continue  # a file whose version was set back by hand: the column is there already
                await tx.execute(statement)
            await tx.execute(META[0], (str(schema.SCHEMA_VERSION),))
            await tx.execute(META[1], (uuid.uuid4().hex,))
            await tx.execute(f"PRAGMA user_version = {schema.SCHEMA_VERSION}")
        if version != schema.SCHEMA_VERSION:
            log.info("state.migrated", store=str(self.path), from_version=version, to_version=schema.SCHEMA_VERSION)

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None
        if self._lock:
            self._lock.release()
            self._lock = None

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StateError("the state database is not open")
        return self._db

    async def fetch(self, sql: str, params: Iterable[Any] = ()) -> list[Row]:
        return (await _SqliteConn(self._conn(), self).execute(sql, params)).rows

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Conn]:
        db = self._conn()
        await db.execute("BEGIN IMMEDIATE")
        try:
            yield _SqliteConn(db, self)
        except BaseException:
            await db.execute("ROLLBACK")
            raise
        await db.execute("COMMIT")

    def is_missing_table(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.OperationalError) and "no such table" in str(exc)


# -- PostgreSQL --------------------------------------------------------------------------------

SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
CONNECT_TIMEOUT = 10
"""Seconds to wait for PostgreSQL to answer a connection, unless the URL says `connect_timeout`."""


def redact_url(url: str) -> str:
    """`url` without any password (what errors and logs may show)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "postgresql://…"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = (parts.username or "") + ":***"
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc[-1]}"))


def _adapt(params: Iterable[Any]) -> list[Any]:
    """Parameters as the columns store them: booleans as 0/1 (the SQLite store's integers)."""
    return [int(p) if isinstance(p, bool) else p for p in params]


class _PgConn:
    def __init__(self, conn: Any, backend: Backend):
        self._conn = conn
        self._backend = backend

    async def execute(self, sql: str, params: Iterable[Any] = ()) -> Result:
        cur = await self._conn.execute(self._backend.sql(sql), _adapt(params))
        if cur.description is None:
            return Result([], cur.rowcount)
        names = tuple(d.name for d in cur.description)
        return Result([Row(names, r) for r in await cur.fetchall()], cur.rowcount)

    async def executemany(self, sql: str, rows: Iterable[Iterable[Any]]) -> None:
        batch = [_adapt(r) for r in rows]
        if batch:
            async with self._conn.cursor() as cur:
                await cur.executemany(self._backend.sql(sql), batch)


class PostgresBackend(Backend):
    """The tables in one PostgreSQL schema, reached through psycopg 3's async connections: one for
    transactions (the store runs one at a time), one in autocommit for reads. A connection found
    broken is made again at its next use."""

    dialect = "postgres"
    shared = True

    def __init__(self, url: str, *, password: str | None = None, schema_name: str = "ingestd",
                 application_name: str = "ingestd"):
        super().__init__()
        if not SCHEMA_NAME.match(schema_name):
            raise StateError(f"state schema {schema_name!r} is not a plain lower-case PostgreSQL name")
        self.url = url
        self.schema = schema_name
        self.where = f"state store {redact_url(url)} (schema {schema_name})"
        self._password = password
        self._application_name = application_name
        self._tx: Any = None
        self._read: Any = None

    def _placeholders(self, text: str) -> str:
        return text.replace("%", "%%").replace("?", "%s")

    def _psycopg(self) -> Any:
        try:
            import psycopg
        except ImportError:
            raise StateError("daemon.state_url needs psycopg (PostgreSQL driver): install ingestd with the "
                             "`postgres` extra (pip install 'ingestd[postgres]')") from None
        return psycopg

    async def _connect(self) -> Any:
        psycopg = self._psycopg()
        kwargs: dict[str, Any] = {"autocommit": True, "application_name": self._application_name}
        if "connect_timeout" not in self.url:
            kwargs["connect_timeout"] = CONNECT_TIMEOUT
        if self._password is not None:
            kwargs["password"] = self._password
        try:
            conn = await psycopg.AsyncConnection.connect(self.url, **kwargs)
        except psycopg.Error as exc:
            raise StateError(f"{self.where}: cannot connect: {self._scrubbed(exc)}") from None
        except Exception as exc:  # a malformed URL (ProgrammingError is a psycopg.Error; this is the rest)
            raise StateError(f"{self.where}: cannot connect: {type(exc).__name__}: {self._scrubbed(exc)}") from None
        await conn.execute(psycopg.sql.SQL("SET search_path TO {}").format(psycopg.sql.Identifier(self.schema)))
        return conn

    def _scrubbed(self, exc: BaseException) -> str:
        text = " ".join(str(exc).split())
        if self._password:
            text = text.replace(self._password, "***")
        return scrub(text.replace(self.url, redact_url(self.url)))

    async def open(self, writer: bool) -> None:
        try:
            self._tx = await self._connect()
            self._read = await self._connect()
            if writer:
                await self._migrate()
            else:
                found = await self.fetch("SELECT to_regclass(?)", (f"{self.schema}.meta",))
                if not found or found[0][0] is None:
                    raise StateError(f"no state store in {self.where} (has the daemon run yet?)")
            await self._read_store_id()
        except BaseException as exc:
            await self.close()
            psycopg = self._psycopg()
            if isinstance(exc, psycopg.Error):
                raise StateError(f"{self.where} cannot be used: {self._scrubbed(exc)}") from None
            raise

    async def _migrate(self) -> None:
        """Create or migrate the schema in one transaction, under an advisory lock, so that
        replicas starting together take turns (the second finds the work done)."""
        conn = self._tx
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"ingestd.state:{self.schema}"])
            await conn.execute(self._psycopg().sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                self._psycopg().sql.Identifier(self.schema)))
            tx = _PgConn(conn, self)
            found = (await tx.execute("SELECT to_regclass(?)", (f"{self.schema}.meta",))).rows
            version = 0
            if found and found[0][0] is not None:
                rows = (await tx.execute("SELECT value FROM meta WHERE key = 'schema_version'")).rows
                version = int(rows[0][0]) if rows else 0
            if version > schema.SCHEMA_VERSION:
                raise StateError(f"{self.where} has schema version {version}, newer than this ingestd's "
                                 f"{schema.SCHEMA_VERSION}")
            for statement in schema.steps(version, version == 0, self.dialect):
                await conn.execute(statement)
            await tx.execute(META[0], (str(schema.SCHEMA_VERSION),))
            await tx.execute(META[1], (uuid.uuid4().hex,))
        if version != schema.SCHEMA_VERSION:
            log.info("state.migrated", store=self.where, from_version=version, to_version=schema.SCHEMA_VERSION)

    async def close(self) -> None:
        for attr in ("_tx", "_read"):
            conn = getattr(self, attr)
            setattr(self, attr, None)
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()

    async def _usable(self, attr: str) -> Any:
        conn = getattr(self, attr)
        if conn is None:
            raise StateError("the state store is not open")
        if conn.broken or conn.closed:
            log.warning("state.reconnect", store=self.where)
            conn = await self._connect()
            setattr(self, attr, conn)
        return conn

    async def fetch(self, sql: str, params: Iterable[Any] = ()) -> list[Row]:
        """A read; one that fails because its connection broke (a server restart, a failover) is
        tried once more on a new one. Transactions are not: their caller decides."""
        conn = await self._usable("_read")
        try:
            return (await _PgConn(conn, self).execute(sql, params)).rows
        except self._psycopg().OperationalError:
            if not conn.broken:
                raise
        return (await _PgConn(await self._usable("_read"), self).execute(sql, params)).rows

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Conn]:
        """A transaction on the writing connection; one that breaks is a StateError (the next
        transaction connects again)."""
        conn = await self._usable("_tx")
        try:
            async with conn.transaction():
                yield _PgConn(conn, self)
        except self._psycopg().OperationalError as exc:
            if not conn.broken:
                raise
            raise StateError(f"{self.where}: the connection was lost ({self._scrubbed(exc)}); the transaction "
                             "did not complete (unless it broke while committing)") from None

    def is_missing_table(self, exc: BaseException) -> bool:
        return type(exc).__name__ == "UndefinedTable"


def default_replica_id(host: str) -> str:
    """`<host>-<6 hex>`: unique per process, so two daemons on one host never share leases."""
    return f"{host}-{uuid.uuid4().hex[:6]}"
