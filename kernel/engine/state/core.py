"""The store's plumbing: its backend, one write transaction at a time, and the event outbox.

Events are inserted into the outbox inside the same transaction as the change they report, each
row marked with the replica that committed it, and handed to `on_events` only after that
transaction commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any, Self

from ...core.events import Event
from ...core.secrets import scrub_value
from .backends import Backend, Conn, PostgresBackend, Result, SqliteBackend, default_replica_id
from .rows import Row, iso, now_utc


class ScrubbingConnection:
    """The connection a transaction writes through: every text parameter is scrubbed of the
    configured secrets first (`ingestd.core.secrets`), so error texts, reject samples and outbox
    payloads are stored without them."""

    def __init__(self, conn: Conn):
        self._conn = conn

    async def execute(self, sql: str, params: Iterable[Any] = ()) -> Result:
        return await self._conn.execute(sql, scrub_value(list(params)))

    async def executemany(self, sql: str, rows: Iterable[Iterable[Any]]) -> None:
        await self._conn.executemany(sql, [scrub_value(list(r)) for r in rows])


class Tx:
    """One open write transaction; `emit` queues an event into the outbox within it."""

    def __init__(self, conn: Conn, outbox: bool, replica: str, *, tag: bool = False):
        self.db = ScrubbingConnection(conn)
        self.outbox = outbox
        self.replica = replica
        self.tag = tag
        """Whether each event's payload names the replica that committed it (replicas share the store)."""
        self.events: list[Event] = []

    def emit(self, event: Event) -> None:
        self.events.append(event)

    async def flush_outbox(self) -> None:
        if not self.outbox:
            return
        await self.db.executemany(
            "INSERT INTO outbox (type, source, payload, created_at, replica) VALUES (?, ?, ?, ?, ?)",
            [(e.type, e.source, json.dumps(self.payload(e), default=str), iso(now_utc()), self.replica)
             for e in self.events])

    def payload(self, event: Event) -> dict[str, Any]:
        return {**event.to_json(), "replica": self.replica} if self.tag else event.to_json()

    async def upsert_partition(self, source: str, day: str, **fields: Any) -> None:
        cols = ["source", "day", *fields]
        values = [source, day, *fields.values()]
        if "status" not in fields:
            cols.append("status")
            values.append("unknown")
        action = ("DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in fields)) if fields else "DO NOTHING"
        await self.db.execute(
            f"INSERT INTO partitions ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
            f" ON CONFLICT (source, day) {action}", values)


class StoreCore:
    """A state store's connection and transactions. `url` (PostgreSQL) or else `path` (SQLite)
    says where it lives; `replica` names this process among the replicas sharing it, and
    `lease_seconds` is how long a lease or heartbeat lasts."""

    def __init__(self, path: Path, *, outbox: bool = False,
                 on_events: Callable[[list[Event]], None] | None = None, writer: bool = True,
                 url: str | None = None, password: str | None = None, schema: str = "ingestd",
                 replica: str | None = None, lease_seconds: float = 30.0, exclusive: bool = True):
        self.path = Path(path)
        self.outbox_enabled = outbox
        self.on_events = on_events or (lambda events: None)
        self.writer = writer
        self.host = socket.gethostname()
        self.replica = replica or default_replica_id(self.host)
        self.lease_seconds = float(lease_seconds)
        self.backend: Backend = (
            PostgresBackend(url, password=password, schema_name=schema, application_name=f"ingestd {self.replica}"[:63])
            if url else SqliteBackend(self.path, exclusive=exclusive))
        self.exclusive = exclusive and not url
        """Whether this process is the store's only writer (a SQLite file under its lock)."""
        self.pid = os.getpid()
        self._tx_lock: asyncio.Lock | None = None

    @property
    def shared(self) -> bool:
        """Whether replicas may share this store (PostgreSQL)."""
        return self.backend.shared

    @property
    def store_id(self) -> str:
        return self.backend.store_id

    async def open(self) -> Self:
        self._tx_lock = asyncio.Lock()
        await self.backend.open(self.writer)
        return self

    async def close(self) -> None:
        await self.backend.close()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        assert self._tx_lock is not None, "the state store is not open"
        async with self._tx_lock, self.backend.transaction() as conn:
            tx = Tx(conn, self.outbox_enabled, self.replica, tag=self.shared)
            yield tx
            await tx.flush_outbox()
        if tx.events:
            self.on_events(tx.events)

    async def emit(self, events: Iterable[Event]) -> None:
        async with self.transaction() as tx:
            for e in events:
                tx.emit(e)

    async def _all(self, sql: str, params: Iterable[Any] = ()) -> list[Row]:
        return await self.backend.fetch(sql, params)
