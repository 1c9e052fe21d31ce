"""The state store's records: partitions, runs, rejects, backfills, windows, result schemas, the
event outbox, and the reads of the status page and `/metrics`, in SQL both backends run."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable, Iterable
from typing import Any, Self

from ...core.errors import StateError
from ...core.events import Event
from .leases import LIVE, Leases, utc_iso
from .rows import (
    Backfill,
    PartitionRow,
    RunRow,
    StoredSchema,
    backfill,
    iso,
    now_utc,
    one,
    partition,
    run,
    stored_schema,
)

FORGET_REPLICAS_SECONDS = 7 * 86400
"""A replica not seen for this long loses its `replicas` row (each start with a generated id adds
one). Nothing else needs the row: a replica without one counts as dead, as it is."""


class StateStore(Leases):
    """One store per process. With `url` (PostgreSQL) several replicas share it, each with its
    own `replica` id; without, a SQLite file at `path` has one writer, holding its lock file."""

    async def open(self) -> Self:
        await super().open()
        try:
            if self.writer and self.exclusive:
                # One process holds the file: whatever an earlier process left unsent is this one's.
                async with self.transaction() as tx:
                    await tx.db.execute("UPDATE outbox SET replica = ? WHERE replica IS NULL OR replica <> ?",
                                        (self.replica, self.replica))
            if self.writer:
                await self.heartbeat()
                await self.forget_replicas(FORGET_REPLICAS_SECONDS)
        except BaseException:
            await self.close()
            raise
        return self

    # -- partitions and runs -------------------------------------------------------------

    async def partition(self, source: str, day: dt.date) -> PartitionRow | None:
        rows = await self._all("SELECT * FROM partitions WHERE source = ? AND day = ?", (source, day.isoformat()))
        return partition(rows[0]) if rows else None

    async def partitions(self, source: str, first: dt.date | None = None,
                         last: dt.date | None = None) -> list[PartitionRow]:
        rows = await self._all(
            "SELECT * FROM partitions WHERE source = ? AND day >= ? AND day <= ? ORDER BY day",
            (source, (first or dt.date.min).isoformat(), (last or dt.date.max).isoformat()))
        return [partition(r) for r in rows]

    async def start_run(self, source: str, day: dt.date, trigger: str, generation: int,
                        backfill_id: int | None, events: Callable[[str], list[Event]], *,
                        first_load: bool | None = None) -> str:
        run_id = uuid.uuid4().hex[:16]
        async with self.transaction() as tx:
            await tx.db.execute(
                "INSERT INTO runs (run_id, source, day, trigger, status, generation, started_at, backfill_id, pid,"
                " first_load, replica) VALUES (?, ?, ?, ?, 'running', ?, ?, ?, ?, ?, ?)",
                (run_id, source, day.isoformat(), trigger, generation, iso(now_utc()), backfill_id, self.pid,
                 first_load, self.replica))
            for e in events(run_id):
                tx.emit(e)
        return run_id

    async def finish_run(self, run_id: str, *, status: str, reason: str | None = None,
                         rows_fetched: int | None = None, rows_written: int | None = None,
                         rows_rejected: int | None = None, rejects: dict[str, int] | None = None,
                         samples: list[dict[str, Any]] | None = None, fingerprint: str | None = None,
                         duration_ms: int | None = None, partition: dict[str, Any] | None = None,
                         events: Iterable[Event] = (), fence_token: int | None = None) -> None:
        """Close a run and, in the same transaction, update its partition and write its events.
        With `fence_token`, first check this replica still holds the partition's lease with that
        token (`check_fence`): otherwise nothing is written and `FencedOut` is raised."""
        finished = iso(now_utc())
        async with self.transaction() as tx:
            row = (await tx.db.execute("SELECT source, day FROM runs WHERE run_id = ?", (run_id,))).fetchone()
            if row is None:
                raise StateError(f"no run {run_id} in the state database")
            if fence_token is not None:
                await self.check_fence(tx, row["source"], row["day"], fence_token)
            await tx.db.execute(
                "UPDATE runs SET status = ?, reason = ?, rows_fetched = ?, rows_written = ?, rows_rejected = ?,"
                " rejects = ?, fingerprint = ?, finished_at = ?, duration_ms = ? WHERE run_id = ?",
                (status, reason, rows_fetched, rows_written, rows_rejected,
                 json.dumps(rejects) if rejects else None, fingerprint, finished, duration_ms, run_id))
            await tx.db.executemany(
                "INSERT INTO rejects (run_id, source, day, reason, row, at) VALUES (?, ?, ?, ?, ?, ?)",
                [(run_id, row["source"], row["day"], s["reason"], json.dumps(s["row"]), finished)
                 for s in samples or []])
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
        """Runs still marked running that a start-up may settle: on SQLite all of them (one
        process holds the file); on PostgreSQL this replica's and those of replicas not alive."""
        if not self.shared:
            rows = await self._all("SELECT * FROM runs WHERE status = 'running' ORDER BY started_at")
        else:
            rows = await self._all(
                "SELECT * FROM runs WHERE status = 'running' AND (replica IS NULL OR replica = ?"
                f" OR replica NOT IN ({LIVE})) ORDER BY started_at", (self.replica, self.lease_seconds))
        return [run(r) for r in rows]

    async def run(self, run_id: str) -> RunRow | None:
        rows = await self._all("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        return run(rows[0]) if rows else None

    async def last_run(self, source: str) -> RunRow | None:
        rows = await self._all("SELECT * FROM runs WHERE source = ? AND status != 'running'"
                               " ORDER BY finished_at DESC LIMIT 1", (source,))
        return run(rows[0]) if rows else None

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
        return {r.day: r for r in map(run, rows)}

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
            " CASE WHEN first_load = 1 THEN 'first' ELSE 'reload' END AS load,"
            " SUM(rows_written) AS rows, COUNT(*) AS loads FROM runs"
            " WHERE status = 'succeeded' AND day >= ? AND day <= ?"
            " AND substr(finished_at, 1, 10) >= ? AND substr(finished_at, 1, 10) <= ?"
            " GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4",
            ((first or dt.date.min).isoformat(), (last or dt.date.max).isoformat(),
             (ran_from or dt.date.min).isoformat(), (ran_to or dt.date.max).isoformat()))
        return [{**{k: r[k] for k in r.keys()}, "rows": None if r["rows"] is None else int(r["rows"])} for r in rows]

    # -- windows -----------------------------------------------------------------------------

    async def window_seen(self, source: str, kind: str) -> dt.datetime | None:
        rows = await self._all("SELECT last_at FROM windows WHERE source = ? AND kind = ?", (source, kind))
        return dt.datetime.fromisoformat(rows[0][0]) if rows and rows[0][0] else None

    async def mark_window(self, source: str, kind: str, at: dt.datetime) -> None:
        """Record the window of `kind` fired at `at` (never moving back), and drop this
        replica's claim on it."""
        async with self.transaction() as tx:
            await tx.db.execute(
                "INSERT INTO windows (source, kind, last_at) VALUES (?, ?, ?)"
                " ON CONFLICT (source, kind) DO UPDATE SET"
                " last_at = CASE WHEN windows.last_at > excluded.last_at THEN windows.last_at"
                " ELSE excluded.last_at END,"
                " claimed_by = CASE WHEN windows.claimed_by = ? THEN NULL ELSE windows.claimed_by END,"
                " claim_due = CASE WHEN windows.claimed_by = ? THEN NULL ELSE windows.claim_due END,"
                " claim_expires = CASE WHEN windows.claimed_by = ? THEN NULL ELSE windows.claim_expires END",
                (source, kind, utc_iso(at), self.replica, self.replica, self.replica))

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
                found = (await tx.db.execute("SELECT * FROM backfills WHERE request_id = ?",
                                             (request_id,))).fetchone()
                if found:
                    return backfill(found), False
            days = [(first + dt.timedelta(days=i)) for i in range((last - first).days + 1)]
            pairs = [(s, d) for d in days for s in sources]
            kept = [(s, d) for s, d in pairs if only is None or only(s, d)]
            created = (await tx.db.execute(
                "INSERT INTO backfills (request_id, sources, day_from, day_to, status, origin, created_at, missing,"
                " skipped) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
                (request_id, json.dumps(sources), first.isoformat(), last.isoformat(), "running", origin,
                 iso(now_utc()), missing, len(pairs) - len(kept)))).fetchone()
            stored = backfill(one(created, "a new backfill"))
            await tx.db.executemany(
                "INSERT INTO backfill_days (backfill_id, source, day, status) VALUES (?, ?, ?, 'pending')",
                [(stored.id, s, d.isoformat()) for s, d in kept])
            for e in events(stored, len(kept)):
                tx.emit(e)
        return stored, True

    async def backfill(self, backfill_id: int) -> Backfill | None:
        rows = await self._all("SELECT * FROM backfills WHERE id = ?", (backfill_id,))
        return backfill(rows[0]) if rows else None

    async def find_backfill(self, sources: list[str], first: dt.date, last: dt.date) -> Backfill | None:
        """An unfinished backfill with exactly these sources and range (to resume it)."""
        rows = await self._all(
            "SELECT * FROM backfills WHERE status = 'running' AND sources = ? AND day_from = ? AND day_to = ?"
            " ORDER BY id DESC LIMIT 1", (json.dumps(sources), first.isoformat(), last.isoformat()))
        return backfill(rows[0]) if rows else None

    async def backfills(self, status: str | None = None) -> list[Backfill]:
        if status:
            rows = await self._all("SELECT * FROM backfills WHERE status = ? ORDER BY id", (status,))
        else:
            rows = await self._all("SELECT * FROM backfills ORDER BY id")
        return [backfill(r) for r in rows]

    async def backfill_days(self, backfill_id: int, status: str | None = None) -> list[tuple[str, dt.date, str]]:
        sql = "SELECT source, day, status FROM backfill_days WHERE backfill_id = ?"
        params: list[Any] = [backfill_id]
        if status:
            sql, params = sql + " AND status = ?", params + [status]
        rows = await self._all(sql + " ORDER BY day, source", params)
        return [(r["source"], dt.date.fromisoformat(r["day"]), r["status"]) for r in rows]

    async def finish_backfill_day(self, backfill_id: int, source: str, day: dt.date, status: str,
                                  run_id: str | None, events: Callable[[int, int], list[Event]]) -> None:
        """Record a backfill day's outcome (and drop its claim: a `pending` outcome returns it)."""
        async with self.transaction() as tx:
            await tx.db.execute("UPDATE backfill_days SET status = ?, run_id = ?, claimed_by = NULL,"
                                " claim_expires = NULL WHERE backfill_id = ? AND source = ? AND day = ?",
                                (status, run_id, backfill_id, source, day.isoformat()))
            done, total = one((await tx.db.execute(
                "SELECT SUM(CASE WHEN status <> 'pending' THEN 1 ELSE 0 END), COUNT(*) FROM backfill_days"
                " WHERE backfill_id = ?", (backfill_id,))).fetchone(), "an aggregate")
            for e in events(_int(done), _int(total)):
                tx.emit(e)

    async def finish_backfill(self, backfill_id: int, status: str, events: Iterable[Event] = ()) -> bool:
        """End a running backfill with `status` and its events; False (nothing written) when it
        was not running: replicas finishing its last days at once end it, and say so, once."""
        async with self.transaction() as tx:
            done = await tx.db.execute("UPDATE backfills SET status = ?, finished_at = ? WHERE id = ?"
                                       " AND status = 'running'", (status, iso(now_utc()), backfill_id))
            if done.rowcount != 1:
                return False
            if status == "cancelled":
                await tx.db.execute("UPDATE backfill_days SET status = 'cancelled' WHERE backfill_id = ?"
                                    " AND status = 'pending'", (backfill_id,))
            for e in events:
                tx.emit(e)
        return True

    # -- result schemas (drift) ----------------------------------------------------------------

    async def result_schema(self, source: str) -> StoredSchema | None:
        """The result schema the source's last successful load stored, with any drift seen since.
        None too for a database of version 2 read without migrating it (`ingestd status` before
        the new daemon first ran)."""
        try:
            rows = await self._all("SELECT * FROM result_schemas WHERE source = ?", (source,))
        except Exception as exc:
            if self.writer or not self.backend.is_missing_table(exc):
                raise
            return None
        return stored_schema(rows[0]) if rows else None

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
        """This replica's oldest unsent events (others' are theirs, or `adopt_outbox`'s)."""
        rows = await self._all("SELECT seq, type, source, payload FROM outbox WHERE replica = ? ORDER BY seq LIMIT ?",
                               (self.replica, limit))
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
            " FROM runs WHERE source = ? AND day >= ? AND day <= ?) AS t WHERE n <= ? ORDER BY day, n",
            (source, first.isoformat(), last.isoformat(), per_day))
        out: dict[dt.date, list[RunRow]] = {}
        for r in rows:
            found = run(r)
            out.setdefault(found.day, []).append(found)
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
            f" FROM rejects WHERE run_id IN ({marks})) AS t WHERE n <= ? ORDER BY run_id, n", [*run_ids, per_run])
        for r in rows:
            out.setdefault(r["run_id"], {"reasons": {}, "samples": []})["samples"].append(
                {"reason": r["reason"], "row": json.loads(r["row"])})
        return out

    async def partition_counts(self) -> dict[tuple[str, str], int]:
        """Days per (source, status) in the whole state store."""
        rows = await self._all("SELECT source, status, COUNT(*) FROM partitions GROUP BY source, status")
        return {(r[0], r[1]): int(r[2]) for r in rows}

    async def last_loaded_at(self) -> dict[str, str]:
        """Per source, when its newest successful load finished (ISO-8601)."""
        rows = await self._all("SELECT source, MAX(finished_at) FROM runs WHERE status = 'succeeded' GROUP BY source")
        return {r[0]: r[1] for r in rows if r[1]}

    async def outbox_depth(self) -> int:
        """This replica's unsent events."""
        rows = await self._all("SELECT COUNT(*) FROM outbox WHERE replica = ?", (self.replica,))
        return _int(rows[0][0])

    async def backfill_progress(self, backfill_id: int) -> dict[str, int]:
        """A backfill's source-days by status (`total` too) and the rows its loads wrote."""
        rows = await self._all("SELECT status, COUNT(*) FROM backfill_days WHERE backfill_id = ? GROUP BY status",
                               (backfill_id,))
        out = {r[0]: int(r[1]) for r in rows}
        out["total"] = sum(out.values())
        out["done"] = out["total"] - out.get("pending", 0)
        written = await self._all("SELECT COALESCE(SUM(rows_written), 0), COALESCE(SUM(rows_fetched), 0) FROM runs"
                                  " WHERE backfill_id = ?", (backfill_id,))
        out["rows"], out["rows_fetched"] = int(written[0][0]), int(written[0][1])
        return out


def _int(value: Any) -> int:
    """An aggregate as an int (PostgreSQL's SUM of bigints is a numeric; SQLite's of no rows, NULL)."""
    return int(value) if value is not None else 0
