"""The state store: partitions, runs, rejects, backfills, windows, result schemas, the event
outbox, and the leases and claims of replicas sharing it.

It lives in a SQLite file (WAL, one writer holding a lock file beside it: the default) or, with
`[daemon] state_url`, in a PostgreSQL schema that several daemons (replicas) share. The SQL and
its semantics are written once (`store`, `leases`) over two small backends (`backends`); the
tables and their migrations are in `schema`.

| module | job |
| --- | --- |
| `schema` | the tables (version `SCHEMA_VERSION`) and the migrations to it |
| `backends` | SQLite (aiosqlite) and PostgreSQL (psycopg 3 async): connect, migrate, run SQL |
| `core` | one write transaction at a time, the outbox, scrubbing secrets from stored texts |
| `leases` | heartbeats, partition leases with fencing tokens, window and backfill-day claims, outbox adoption |
| `store` | partitions, runs, backfills, windows, result schemas, outbox, status reads |
| `rows` | what reads return |
| `lock` | the SQLite file's lock |
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .backends import redact_url
from .core import ScrubbingConnection, Tx
from .lock import StateLock
from .rows import Backfill, PartitionRow, ReplicaRow, Row, RunRow, StoredSchema, iso, now_utc
from .schema import MIGRATIONS, SCHEMA, SCHEMA_VERSION
from .store import StateStore

if TYPE_CHECKING:
    from collections.abc import Callable

    from ...core.config import Config
    from ...core.events import Event


def open_args(config: Config) -> dict[str, Any]:
    """The keyword arguments of `StateStore` that `[daemon]` decides: where the state lives, and
    this process's replica id and lease length."""
    d = config.daemon
    return {"url": d.state_url or None, "password": d.state_password.reveal() if d.state_password else None,
            "schema": d.state_schema, "replica": config.replica_id(), "lease_seconds": d.lease_seconds}


def store_for(config: Config, *, outbox: bool = False, on_events: Callable[[list[Event]], None] | None = None,
              writer: bool = True, replica: str | None = None) -> StateStore:
    """The state store `config` names (not opened yet); `replica` overrides the configured id."""
    args = open_args(config)
    if replica is not None:
        args["replica"] = replica
    return StateStore(config.state_path(), outbox=outbox, on_events=on_events, writer=writer, **args)


__all__ = ["MIGRATIONS", "SCHEMA", "SCHEMA_VERSION", "Backfill", "PartitionRow", "ReplicaRow", "Row", "RunRow",
           "ScrubbingConnection", "StateLock", "StateStore", "StoredSchema", "Tx", "iso", "now_utc", "open_args",
           "redact_url", "store_for"]
