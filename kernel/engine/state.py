"""The state store: partitions, runs, rejects, backfills, windows, and the event outbox.

One SQLite file (WAL) written through one aiosqlite connection, one transaction at a time.
Events are inserted into the outbox inside the same transaction as the change they report, and
handed to `on_events` only after that transaction commits. A writer takes an exclusive lock file
beside the database, so two daemons (or a daemon and `ingestd load`) never write at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import json
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from ..core.errors import StateError
from ..core.events import Event
from ..core.secrets import scrub_value

SCHEMA_VERSION = 3

RESULT_SCHEMAS = """
CREATE TABLE IF NOT EXISTS result_schemas (
    source TEXT PRIMARY KEY, columns TEXT NOT NULL, query_hash TEXT NOT NULL, day TEXT NOT NULL,
    run_id TEXT, stored_at TEXT NOT NULL, seen TEXT, change TEXT, changed_at TEXT
)"""
"""Schema drift (version 3): per source, the query's result columns (`[{name, type, family}]`) as
its last successful load saw them, with the query text's hash and that load's day and run; `seen`,
a different schema a later load or probe saw (NULL once a load stores it); `change`, the last
change seen (what `schema.changed` said) and when."""

SCHEMA = RESULT_SCHEMAS + """;
CREATE TABLE IF NOT EXISTS partitions (
    source TEXT NOT NULL, day TEXT NOT NULL, status TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0, rows INTEGER, source_rows INTEGER, fingerprint TEXT,
    loaded_at TEXT, checked_at TEXT, last_run_id TEXT, error TEXT, ready_at TEXT, held_rows INTEGER,
    PRIMARY KEY (source, day)
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, source TEXT NOT NULL, day TEXT NOT NULL, trigger TEXT NOT NULL,
    status TEXT NOT NULL, reason TEXT, generation INTEGER,
    rows_fetched INTEGER, rows_written INTEGER, rows_rejected INTEGER, rejects TEXT,
    fingerprint TEXT, started_at TEXT NOT NULL, finished_at TEXT, duration_ms INTEGER,
    backfill_id INTEGER, pid INTEGER, first_load INTEGER
);
CREATE INDEX IF NOT EXISTS runs_by_partition ON runs (source, day);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status);
CREATE TABLE IF NOT EXISTS rejects (
    id INTEGER PRIMARY KEY, run_id TEXT NOT NULL, source TEXT NOT NULL, day TEXT NOT NULL,
    reason TEXT NOT NULL, row TEXT NOT NULL, at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS backfills (
    id INTEGER PRIMARY KEY, request_id TEXT UNIQUE, sources TEXT NOT NULL,
    day_from TEXT NOT NULL, day_to TEXT NOT NULL, status TEXT NOT NULL,
    origin TEXT, created_at TEXT NOT NULL, finished_at TEXT, missing INTEGER NOT NULL DEFAULT 0,
    skipped INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS backfill_days (
    backfill_id INTEGER NOT NULL, source TEXT NOT NULL, day TEXT NOT NULL,
    status TEXT NOT NULL, run_id TEXT,
    PRIMARY KEY (backfill_id, source, day)
);
CREATE TABLE IF NOT EXISTS windows (
    source TEXT NOT NULL, kind TEXT NOT NULL, last_at TEXT NOT NULL,
    PRIMARY KEY (source, kind)
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT NOT NULL, source TEXT,
    payload TEXT NOT NULL, created_at TEXT NOT NULL
);
DROP VIEW IF EXISTS usage;
CREATE VIEW usage AS
    SELECT source, day, trigger, CASE WHEN first_load THEN 'first' ELSE 'reload' END AS load,
           substr(finished_at, 1, 10) AS ran_on, SUM(rows_written) AS rows, COUNT(*) AS loads
    FROM runs WHERE status = 'succeeded' GROUP BY source, day, trigger, load, ran_on;
"""

MIGRATIONS: dict[int, list[str]] = {
    2: ["ALTER TABLE partitions ADD COLUMN ready_at TEXT",
        "ALTER TABLE partitions ADD COLUMN held_rows INTEGER",
        "ALTER TABLE runs ADD COLUMN first_load INTEGER",
        "ALTER TABLE backfills ADD COLUMN missing INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE backfills ADD COLUMN skipped INTEGER NOT NULL DEFAULT 0"],
    3: [RESULT_SCHEMAS],
}
"""Statements that bring a database of the version before up to this version; a new database
gets SCHEMA directly."""


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def iso(t: dt.datetime | None) -> str | None:
    return t.isoformat() if t else None


@dataclass(frozen=True)
class PartitionRow:
    source: str
    day: dt.date
    status: str
    generation: int
    rows: int | None
    source_rows: int | None
    fingerprint: str | None
    loaded_at: str | None
    checked_at: str | None
    last_run_id: str | None
    error: str | None
    ready_at: str | None = None
    held_rows: int | None = None


@dataclass(frozen=True)
class RunRow:
    run_id: str
    source: str
    day: dt.date
    trigger: str
    status: str
    reason: str | None
    generation: int | None
    rows_fetched: int | None
    rows_written: int | None
    rows_rejected: int | None
    fingerprint: str | None
    started_at: str
    finished_at: str | None
    duration_ms: int | None
    backfill_id: int | None
    first_load: bool | None = None


@dataclass(frozen=True)
class Backfill:
    id: int
    request_id: str | None
    sources: list[str]
    day_from: dt.date
    day_to: dt.date
    status: str
    created_at: str
    missing: bool = False
    skipped: int = 0


@dataclass(frozen=True)
class StoredSchema:
    """A source's row of `result_schemas` (see RESULT_SCHEMAS)."""

    source: str
    columns: list[dict[str, Any]]
    query_hash: str
    day: dt.date
    run_id: str | None
    stored_at: str
    seen: list[dict[str, Any]] | None = None
    change: dict[str, Any] | None = None
    changed_at: str | None = None


class StateLock:
    """An exclusive lock file beside the state database, holding the owner's pid."""

    def __init__(self, db_path: Path):
        self.path = db_path.with_name(db_path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StateError(f"state database {self.path.with_suffix('')} is in use by another ingestd "
                             f"process (pid {holder}); stop it, or send it requests with `ingestd request`") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def holder(self) -> str | None:
        """The pid of the process holding the lock now, or None when it is free."""
        if not self.path.exists():
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class StateStore:
    def __init__(self, path: Path, *, outbox: bool = False,
                 on_events: Callable[[list[Event]], None] | None = None, writer: bool = True):
        self.path = Path(path)
        self.outbox_enabled = outbox
        self.on_events = on_events or (lambda events: None)
        self.writer = writer
        self._db: aiosqlite.Connection | None = None
        self._lock = StateLock(self.path) if writer else None
        self._tx_lock: asyncio.Lock | None = None

    async def open(self) -> StateStore:
        self._tx_lock = asyncio.Lock()
        if not self.writer and not self.path.exists():
            raise StateError(f"no state database at {self.path} (has the daemon run yet?)")
        if self._lock:
            self._lock.acquire()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = await aiosqlite.connect(self.path, timeout=5.0)
            self._db.row_factory = sqlite3.Row
            await self._db.execute("PRAGMA busy_timeout = 5000")
            check = _one(await (await self._db.execute("PRAGMA quick_check")).fetchone(), "quick_check")
            if check[0] != "ok":
                raise StateError(f"state database {self.path} is corrupt ({check[0]}); it was not reset: "
                                 f"restore it from a backup or move it away to start afresh")
            if self.writer:
                await self._db.execute("PRAGMA journal_mode = WAL")
                await self._db.execute("PRAGMA synchronous = NORMAL")
                version = _one(await (await self._db.execute("PRAGMA user_version")).fetchone(), "user_version")[0]
                if version > SCHEMA_VERSION:
                    raise StateError(f"state database {self.path} has schema version {version}, newer than "
                                     f"this ingestd's {SCHEMA_VERSION}")
                fresh = not await self._all("SELECT 1 FROM sqlite_master WHERE name = 'runs'")
                for step in range(version + 1, SCHEMA_VERSION + 1):
                    for statement in ([] if fresh else MIGRATIONS.get(step, [])):
                        await self._db.execute(statement)
                await self._db.executescript(SCHEMA)
                await self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                await self._db.commit()
        except sqlite3.DatabaseError as exc:
            await self.close()
            raise StateError(f"state database {self.path} cannot be used: {exc} (it was not reset: restore it "
                             f"from a backup or move it away to start afresh)") from exc
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None
        if self._lock:
            self._lock.release()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        assert self._db is not None and self._tx_lock is not None
        async with self._tx_lock:
            tx = Tx(self._db, self.outbox_enabled)
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                yield tx
                await tx.flush_outbox()
            except BaseException:
                await self._db.rollback()
                raise
            await self._db.commit()
        if tx.events:
            self.on_events(tx.events)

    async def emit(self, events: Iterable[Event]) -> None:
        async with self.transaction() as tx:
            for e in events:
                tx.emit(e)

    async def _all(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        assert self._db is not None
        return list(await (await self._db.execute(sql, tuple(params))).fetchall())

    # -- partitions and runs -------------------------------------------------------------

    async def partition(self, source: str, day: dt.date) -> PartitionRow | None:
        rows = await self._all("SELECT * FROM partitions WHERE source = ? AND day = ?", (source, day.isoformat()))
        return _partition(rows[0]) if rows else None

    async def partitions(self, source: str, first: dt.date | None = None,
                         last: dt.date | None = None) -> list[PartitionRow]:
        rows = await self._all(
            "SELECT * FROM partitions WHERE source = ? AND day >= ? AND day <= ? ORDER BY day",
            (source, (first or dt.date.min).isoformat(), (last or dt.date.max).isoformat()))
        return [_partition(r) for r in rows]

    async def start_run(self, source: str, day: dt.date, trigger: str, generation: int,
                        backfill_id: int | None, events: Callable[[str], list[Event]], *,
                        first_load: bool | None = None) -> str:
        run_id = uuid.uuid4().hex[:16]
        async with self.transaction() as tx:
            await tx.db.execute(
                "INSERT INTO runs (run_id, source, day, trigger, status, generation, started_at, backfill_id, pid,"
                " first_load) VALUES (?, ?, ?, ?, 'running', ?, ?, ?, ?, ?)",
                (run_id, source, day.isoformat(), trigger, generation, iso(now_utc()), backfill_id, os.getpid(),
                 first_load))
            for e in events(run_id):
                tx.emit(e)
        return run_id

    async def finish_run(self, run_id: str, *, status: str, reason: str | None = None,
                         rows_fetched: int | None = None, rows_written: int | None = None,
                         rows_rejected: int | None = None, rejects: dict[str, int] | None = None,
                         samples: list[dict[str, Any]] | None = None, fingerprint: str | None = None,
                         duration_ms: int | None = None, partition: dict[str, Any] | None = None,
                         events: Iterable[Event] = ()) -> None:
        """Close a run and, in the same transaction, update its partition and write its events."""
        finished = iso(now_utc())
        async with self.transaction() as tx:
            row = await (await tx.db.execute("SELECT source, day FROM runs WHERE run_id = ?", (run_id,))).fetchone()
            if row is None:
                raise StateError(f"no run {run_id} in the state database")
            await tx.db.execute(
                "UPDATE runs SET status = ?, reason = ?, rows_fetched = ?, rows_written = ?, rows_rejected = ?,"
                " rejects = ?, fingerprint = ?, finished_at = ?, duration_ms = ? WHERE run_id = ?",
                (status, reason, rows_fetched, rows_written, rows_rejected,
                 json.dumps(rejects) if rejects else None, fingerprint, finished, duration_ms, run_id))
            for sample in samples or []:
                await tx.db.execute(
                    "INSERT INTO rejects (run_id, source, day, reason, row, at) VALUES (?, ?, ?, ?, ?, ?)",
                    (run_id, row["source"], row["day"], sample["reason"], json.dumps(sample["row"]), finished))
            if partition is not None:
                await tx.upsert_partition(row["source"], row["day"], last_run_id=run_id, **partition)
            for e in events:
                tx.emit(e)

    async def set_partition(self, source: str, day: dt.date, events: Iterable[Event] = (), **fields: Any) -> None:
        async with self.transaction() as tx:
            await tx.upsert_partition(source, day.isoformat(), **fields)
            for e in events:
                tx.emit(e)

    async def running_runs(self) -> list[RunRow]:
        return [_run(r) for r in await self._all("SELECT * FROM runs WHERE status = 'running' ORDER BY started_at")]

    async def last_run(self, source: str) -> RunRow | None:
        rows = await self._all("SELECT * FROM runs WHERE source = ? AND status != 'running'"
                               " ORDER BY finished_at DESC LIMIT 1", (source,))
        return _run(rows[0]) if rows else None

    async def progress(self, run_id: str, rows_fetched: int) -> None:
        """Rows a running load has fetched so far (what `status` shows while it runs)."""
        async with self.transaction() as tx:
            await tx.db.execute("UPDATE runs SET rows_fetched = ? WHERE run_id = ? AND status = 'running'",
                                (rows_fetched, run_id))

    async def latest_runs(self, source: str, first: dt.date, last: dt.date) -> dict[dt.date, RunRow]:
        """The latest run of each day of `source` in [first, last] that has one."""
        rows = await self._all(
            "SELECT * FROM runs r WHERE source = ? AND day >= ? AND day <= ? AND rowid = ("
            " SELECT rowid FROM runs WHERE source = r.source AND day = r.day ORDER BY started_at DESC, rowid DESC"
            " LIMIT 1)", (source, first.isoformat(), last.isoformat()))
        return {run.day: run for run in map(_run, rows)}

    async def last_loaded_day(self, source: str) -> dt.date | None:
        rows = await self._all("SELECT MAX(day) FROM partitions WHERE source = ? AND generation > 0", (source,))
        return dt.date.fromisoformat(rows[0][0]) if rows and rows[0][0] else None

    async def usage(self, first: dt.date | None = None, last: dt.date | None = None, *,
                    ran_from: dt.date | None = None, ran_to: dt.date | None = None,
                    by: str = "day") -> list[dict[str, Any]]:
        """Rows metered by successful loads: per source, day loaded (or, `by="month"`, month the
        load ran), trigger and load kind (`first` load of the day or `reload`)."""
        period = "substr(finished_at, 1, 7)" if by == "month" else "day"
        label = "month" if by == "month" else "day"
        rows = await self._all(
            f"SELECT source, {period} AS {label}, trigger,"
            " CASE WHEN first_load THEN 'first' ELSE 'reload' END AS load,"
            " SUM(rows_written) AS rows, COUNT(*) AS loads FROM runs"
            " WHERE status = 'succeeded' AND day >= ? AND day <= ?"
            " AND substr(finished_at, 1, 10) >= ? AND substr(finished_at, 1, 10) <= ?"
            f" GROUP BY source, {label}, trigger, load ORDER BY source, {label}, trigger, load",
            ((first or dt.date.min).isoformat(), (last or dt.date.max).isoformat(),
             (ran_from or dt.date.min).isoformat(), (ran_to or dt.date.max).isoformat()))
        return [dict(r) for r in rows]

    # -- windows -----------------------------------------------------------------------------

    async def window_seen(self, source: str, kind: str) -> dt.datetime | None:
        rows = await self._all("SELECT last_at FROM windows WHERE source = ? AND kind = ?", (source, kind))
        return dt.datetime.fromisoformat(rows[0][0]) if rows else None

    async def mark_window(self, source: str, kind: str, at: dt.datetime) -> None:
        async with self.transaction() as tx:
            await tx.db.execute(
                "INSERT INTO windows (source, kind, last_at) VALUES (?, ?, ?)"
                " ON CONFLICT (source, kind) DO UPDATE SET last_at = excluded.last_at", (source, kind, iso(at)))

    # -- backfills ---------------------------------------------------------------------------

    async def create_backfill(self, sources: list[str], first: dt.date, last: dt.date, *,
                              request_id: str | None, origin: str,
                              events: Callable[[Backfill, int], list[Event]],
                              only: Callable[[str, dt.date], bool] | None = None,
                              missing: bool = False) -> tuple[Backfill, bool]:
        """Store a backfill and its days durably. Returns (backfill, created); an existing
        request id returns the stored one and False. `only` keeps the (source, day) pairs it
        accepts (`--missing`); the others are counted as skipped."""
        async with self.transaction() as tx:
            if request_id:
                found = await (await tx.db.execute("SELECT * FROM backfills WHERE request_id = ?",
                                                   (request_id,))).fetchone()
                if found:
                    return _backfill(found), False
            days = [(first + dt.timedelta(days=i)) for i in range((last - first).days + 1)]
            pairs = [(s, d) for d in days for s in sources]
            kept = [(s, d) for s, d in pairs if only is None or only(s, d)]
            cur = await tx.db.execute(
                "INSERT INTO backfills (request_id, sources, day_from, day_to, status, origin, created_at, missing,"
                " skipped) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (request_id, json.dumps(sources), first.isoformat(), last.isoformat(), "running", origin,
                 iso(now_utc()), missing, len(pairs) - len(kept)))
            backfill_id = cur.lastrowid
            await tx.db.executemany(
                "INSERT INTO backfill_days (backfill_id, source, day, status) VALUES (?, ?, ?, 'pending')",
                [(backfill_id, s, d.isoformat()) for s, d in kept])
            found = await (await tx.db.execute("SELECT * FROM backfills WHERE id = ?", (backfill_id,))).fetchone()
            backfill = _backfill(_one(found, f"backfill {backfill_id}"))
            for e in events(backfill, len(kept)):
                tx.emit(e)
        return backfill, True

    async def backfill(self, backfill_id: int) -> Backfill | None:
        rows = await self._all("SELECT * FROM backfills WHERE id = ?", (backfill_id,))
        return _backfill(rows[0]) if rows else None

    async def find_backfill(self, sources: list[str], first: dt.date, last: dt.date) -> Backfill | None:
        """An unfinished backfill with exactly these sources and range (to resume it)."""
        rows = await self._all(
            "SELECT * FROM backfills WHERE status = 'running' AND sources = ? AND day_from = ? AND day_to = ?"
            " ORDER BY id DESC LIMIT 1", (json.dumps(sources), first.isoformat(), last.isoformat()))
        return _backfill(rows[0]) if rows else None

    async def backfills(self, status: str | None = None) -> list[Backfill]:
        if status:
            rows = await self._all("SELECT * FROM backfills WHERE status = ? ORDER BY id", (status,))
        else:
            rows = await self._all("SELECT * FROM backfills ORDER BY id")
        return [_backfill(r) for r in rows]

    async def backfill_days(self, backfill_id: int, status: str | None = None) -> list[tuple[str, dt.date, str]]:
        sql = "SELECT source, day, status FROM backfill_days WHERE backfill_id = ?"
        params: list[Any] = [backfill_id]
        if status:
            sql, params = sql + " AND status = ?", params + [status]
        rows = await self._all(sql + " ORDER BY day, source", params)
        return [(r["source"], dt.date.fromisoformat(r["day"]), r["status"]) for r in rows]

    async def finish_backfill_day(self, backfill_id: int, source: str, day: dt.date, status: str,
                                  run_id: str | None, events: Callable[[int, int], list[Event]]) -> None:
        async with self.transaction() as tx:
            await tx.db.execute("UPDATE backfill_days SET status = ?, run_id = ? WHERE backfill_id = ? AND source = ?"
                                " AND day = ?", (status, run_id, backfill_id, source, day.isoformat()))
            done, total = _one(await (await tx.db.execute(
                "SELECT SUM(status != 'pending'), COUNT(*) FROM backfill_days WHERE backfill_id = ?",
                (backfill_id,))).fetchone(), "an aggregate")
            for e in events(done, total):
                tx.emit(e)

    async def finish_backfill(self, backfill_id: int, status: str, events: Iterable[Event] = ()) -> None:
        async with self.transaction() as tx:
            await tx.db.execute("UPDATE backfills SET status = ?, finished_at = ? WHERE id = ?",
                                (status, iso(now_utc()), backfill_id))
            if status == "cancelled":
                await tx.db.execute("UPDATE backfill_days SET status = 'cancelled' WHERE backfill_id = ?"
                                    " AND status = 'pending'", (backfill_id,))
            for e in events:
                tx.emit(e)

    # -- result schemas (drift) ----------------------------------------------------------------

    async def result_schema(self, source: str) -> StoredSchema | None:
        """The result schema the source's last successful load stored, with any drift seen since.
        None too for a database of version 2 read without migrating it (`ingestd status` before
        the new daemon first ran)."""
        try:
            rows = await self._all("SELECT * FROM result_schemas WHERE source = ?", (source,))
        except sqlite3.OperationalError:
            if self.writer:
                raise
            return None
        if not rows:
            return None
        r = rows[0]
        return StoredSchema(r["source"], json.loads(r["columns"]), r["query_hash"], dt.date.fromisoformat(r["day"]),
                            r["run_id"], r["stored_at"], json.loads(r["seen"]) if r["seen"] else None,
                            json.loads(r["change"]) if r["change"] else None, r["changed_at"])

    async def save_result_schema(self, source: str, columns: list[dict[str, Any]], query_hash: str, day: dt.date,
                                 run_id: str | None) -> None:
        """Store the result schema a successful load saw; a drift seen before is settled by it
        (`seen` cleared; the last `change` stays, as history)."""
        async with self.transaction() as tx:
            await tx.db.execute(
                "INSERT INTO result_schemas (source, columns, query_hash, day, run_id, stored_at)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (source) DO UPDATE SET columns = excluded.columns,"
                " query_hash = excluded.query_hash, day = excluded.day, run_id = excluded.run_id,"
                " stored_at = excluded.stored_at, seen = NULL",
                (source, json.dumps(columns), query_hash, day.isoformat(), run_id, iso(now_utc())))

    async def note_schema_seen(self, source: str, seen: list[dict[str, Any]] | None,
                               change: dict[str, Any] | None = None, events: Iterable[Event] = ()) -> None:
        """Record the schema a load or probe saw when it differs from the stored one (None: it
        matches again), and, with `change`, the change and its `schema.changed` events, in one
        transaction."""
        async with self.transaction() as tx:
            await tx.db.execute("UPDATE result_schemas SET seen = ? WHERE source = ?",
                                (json.dumps(seen) if seen is not None else None, source))
            if change is not None:
                await tx.db.execute("UPDATE result_schemas SET change = ?, changed_at = ? WHERE source = ?",
                                    (json.dumps(change), iso(now_utc()), source))
            for e in events:
                tx.emit(e)

    # -- outbox --------------------------------------------------------------------------------

    async def outbox_batch(self, limit: int = 100) -> list[tuple[int, str, str | None, dict[str, Any]]]:
        rows = await self._all("SELECT seq, type, source, payload FROM outbox ORDER BY seq LIMIT ?", (limit,))
        return [(r["seq"], r["type"], r["source"], json.loads(r["payload"])) for r in rows]

    async def outbox_delete(self, seqs: Iterable[int]) -> None:
        seqs = list(seqs)
        if not seqs:
            return
        async with self.transaction() as tx:
            await tx.db.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in seqs])

    # -- reads for the status page and /metrics ------------------------------------------------

    async def ping(self) -> None:
        """Raise unless the database answers (what `/readyz` asks)."""
        await self._all("SELECT 1")

    async def runs_of(self, source: str, first: dt.date, last: dt.date,
                      per_day: int = 5) -> dict[dt.date, list[RunRow]]:
        """The latest `per_day` runs of each day of `source` in [first, last], newest first."""
        rows = await self._all(
            "SELECT * FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY day ORDER BY started_at DESC, rowid DESC) AS n"
            " FROM runs WHERE source = ? AND day >= ? AND day <= ?) WHERE n <= ? ORDER BY day, n",
            (source, first.isoformat(), last.isoformat(), per_day))
        out: dict[dt.date, list[RunRow]] = {}
        for r in rows:
            d = dict(r)
            d.pop("n", None)
            run = _run_from(d)
            out.setdefault(run.day, []).append(run)
        return out

    async def run_rejects(self, run_ids: list[str], per_run: int = 3) -> dict[str, dict[str, Any]]:
        """Per run: rejected rows counted by reason, and up to `per_run` sampled rows."""
        if not run_ids:
            return {}
        marks = ", ".join("?" * len(run_ids))
        out: dict[str, dict[str, Any]] = {}
        for r in await self._all(f"SELECT run_id, rejects FROM runs WHERE run_id IN ({marks})", run_ids):
            out[r["run_id"]] = {"reasons": json.loads(r["rejects"]) if r["rejects"] else {}, "samples": []}
        rows = await self._all(
            f"SELECT run_id, reason, row FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY run_id ORDER BY id) AS n"
            f" FROM rejects WHERE run_id IN ({marks})) WHERE n <= ? ORDER BY run_id, n", [*run_ids, per_run])
        for r in rows:
            out.setdefault(r["run_id"], {"reasons": {}, "samples": []})["samples"].append(
                {"reason": r["reason"], "row": json.loads(r["row"])})
        return out

    async def partition_counts(self) -> dict[tuple[str, str], int]:
        """Days per (source, status) in the whole state store."""
        rows = await self._all("SELECT source, status, COUNT(*) FROM partitions GROUP BY source, status")
        return {(r[0], r[1]): r[2] for r in rows}

    async def last_loaded_at(self) -> dict[str, str]:
        """Per source, when its newest successful load finished (ISO-8601)."""
        rows = await self._all("SELECT source, MAX(finished_at) FROM runs WHERE status = 'succeeded' GROUP BY source")
        return {r[0]: r[1] for r in rows if r[1]}

    async def outbox_depth(self) -> int:
        return int(_one(await (await self._db_or_fail().execute("SELECT COUNT(*) FROM outbox")).fetchone(),
                        "a count")[0])

    async def backfill_progress(self, backfill_id: int) -> dict[str, int]:
        """A backfill's source-days by status (`total` too) and the rows its loads wrote."""
        rows = await self._all("SELECT status, COUNT(*) FROM backfill_days WHERE backfill_id = ? GROUP BY status",
                               (backfill_id,))
        out = {r[0]: r[1] for r in rows}
        out["total"] = sum(out.values())
        out["done"] = out["total"] - out.get("pending", 0)
        written = await self._all("SELECT COALESCE(SUM(rows_written), 0), COALESCE(SUM(rows_fetched), 0) FROM runs"
                                  " WHERE backfill_id = ?", (backfill_id,))
        out["rows"], out["rows_fetched"] = int(written[0][0]), int(written[0][1])
        return out

    def _db_or_fail(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StateError("the state database is not open")
        return self._db


class ScrubbingConnection:
    """The connection a transaction writes through: every text parameter is scrubbed of the
    configured secrets first (`ingestd.core.secrets`), so error texts, reject samples and outbox
    payloads are stored without them."""

    def __init__(self, db: aiosqlite.Connection):
        self._db = db

    async def execute(self, sql: str, params: Iterable[Any] = ()) -> aiosqlite.Cursor:
        return await self._db.execute(sql, scrub_value(list(params)))

    async def executemany(self, sql: str, rows: Iterable[Iterable[Any]]) -> aiosqlite.Cursor:
        return await self._db.executemany(sql, [scrub_value(list(r)) for r in rows])


class Tx:
    """One open write transaction; `emit` queues an event into the outbox within it."""

    def __init__(self, db: aiosqlite.Connection, outbox: bool):
        self.db = ScrubbingConnection(db)
        self.outbox = outbox
        self.events: list[Event] = []

    def emit(self, event: Event) -> None:
        self.events.append(event)

    async def flush_outbox(self) -> None:
        if not self.outbox:
            return
        await self.db.executemany(
            "INSERT INTO outbox (type, source, payload, created_at) VALUES (?, ?, ?, ?)",
            [(e.type, e.source, json.dumps(e.to_json(), default=str), iso(now_utc())) for e in self.events])

    async def upsert_partition(self, source: str, day: str, **fields: Any) -> None:
        cols = ["source", "day", *fields]
        values = [source, day, *fields.values()]
        if "status" not in fields:
            cols.append("status")
            values.append("unknown")
        updates = ", ".join(f"{c} = excluded.{c}" for c in fields) or "status = status"
        await self.db.execute(
            f"INSERT INTO partitions ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
            f" ON CONFLICT (source, day) DO UPDATE SET {updates}", values)


def _one(row: sqlite3.Row | None, what: str) -> sqlite3.Row:
    """A row SQLite always returns (a PRAGMA's, an aggregate's, one just inserted)."""
    if row is None:
        raise StateError(f"state database returned no row for {what}")
    return row


def _partition(r: sqlite3.Row) -> PartitionRow:
    d = dict(r)
    d["day"] = dt.date.fromisoformat(d["day"])
    return PartitionRow(**d)


def _run(r: sqlite3.Row) -> RunRow:
    return _run_from(dict(r))


def _run_from(d: dict[str, Any]) -> RunRow:
    d["day"] = dt.date.fromisoformat(d["day"])
    d.pop("rejects", None)
    d.pop("pid", None)
    d["first_load"] = None if d["first_load"] is None else bool(d["first_load"])
    return RunRow(**d)


def _backfill(r: sqlite3.Row) -> Backfill:
    return Backfill(r["id"], r["request_id"], json.loads(r["sources"]), dt.date.fromisoformat(r["day_from"]),
                    dt.date.fromisoformat(r["day_to"]), r["status"], r["created_at"], bool(r["missing"]),
                    r["skipped"])
