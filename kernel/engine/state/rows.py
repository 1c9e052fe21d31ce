"""What the state store's reads return, and the row type both backends give."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ...core.errors import StateError


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def iso(t: dt.datetime | None) -> str | None:
    return t.isoformat() if t else None


class Row:
    """One result row, read by column name or position (like `sqlite3.Row`), from either backend."""

    __slots__ = ("_index", "_values")

    def __init__(self, names: tuple[str, ...], values: Iterable[Any]):
        self._index = names
        self._values = tuple(values)

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, int | slice):
            return self._values[key]
        try:
            return self._values[self._index.index(key)]
        except ValueError:
            raise KeyError(key) from None

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def keys(self) -> tuple[str, ...]:
        return self._index

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self._index else default

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Row({dict(zip(self._index, self._values, strict=True))!r})"


def one(row: Row | None, what: str) -> Row:
    """A row the database always returns (an aggregate's, one just inserted)."""
    if row is None:
        raise StateError(f"state database returned no row for {what}")
    return row


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
    replica: str | None = None


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
    """A source's row of `result_schemas` (see `schema.RESULT_SCHEMAS`)."""

    source: str
    columns: list[dict[str, Any]]
    query_hash: str
    day: dt.date
    run_id: str | None
    stored_at: str
    seen: list[dict[str, Any]] | None = None
    change: dict[str, Any] | None = None
    changed_at: str | None = None


@dataclass(frozen=True)
class ReplicaRow:
    """A daemon sharing the state store, as its last heartbeat left it (times in UTC)."""

    replica: str
    host: str
    pid: int
    started_at: dt.datetime
    seen_at: dt.datetime


def db_time(value: Any) -> dt.datetime:
    """A database-clock timestamp: PostgreSQL's timestamptz, or SQLite's `strftime` text in UTC."""
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    return dt.datetime.fromisoformat(str(value)).replace(tzinfo=dt.UTC)


PARTITION_FIELDS = tuple(PartitionRow.__dataclass_fields__)
RUN_FIELDS = tuple(RunRow.__dataclass_fields__)


def partition(r: Row) -> PartitionRow:
    d = {k: r[k] for k in PARTITION_FIELDS}
    d["day"] = dt.date.fromisoformat(d["day"])
    return PartitionRow(**d)


def run(r: Row) -> RunRow:
    """A `runs` row (extra columns, such as `rowid` or a window's row number, are left out; a
    column a version-3 file read without migrating it lacks, `replica`, is None)."""
    d = {k: r.get(k) for k in RUN_FIELDS}
    d["day"] = dt.date.fromisoformat(d["day"])
    d["first_load"] = None if d["first_load"] is None else bool(d["first_load"])
    return RunRow(**d)


def backfill(r: Row) -> Backfill:
    return Backfill(r["id"], r["request_id"], json.loads(r["sources"]), dt.date.fromisoformat(r["day_from"]),
                    dt.date.fromisoformat(r["day_to"]), r["status"], r["created_at"], bool(r["missing"]),
                    int(r["skipped"]))


def stored_schema(r: Row) -> StoredSchema:
    return StoredSchema(r["source"], json.loads(r["columns"]), r["query_hash"], dt.date.fromisoformat(r["day"]),
                        r["run_id"], r["stored_at"], json.loads(r["seen"]) if r["seen"] else None,
                        json.loads(r["change"]) if r["change"] else None, r["changed_at"])


def replica(r: Row) -> ReplicaRow:
    return ReplicaRow(r["replica"], r["host"], int(r["pid"]), db_time(r["started_at"]), db_time(r["seen_at"]))
