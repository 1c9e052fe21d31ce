"""Typed lifecycle events.

Every event has a dotted `type`, the `source` and `day` it concerns (None for daemon-wide
events), the time it happened, the `run_id` of the load it belongs to, and a `data` dict of
JSON-safe details. Events are written to the state store's outbox in the same transaction as the
change they report, then handed to `ingestd_event` hooks and the log.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True, kw_only=True)
class Event:
    type: ClassVar[str] = "event"
    source: str | None = None
    day: dt.date | None = None
    run_id: str | None = None
    at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "source": self.source,
            "day": self.day.isoformat() if self.day else None,
            "at": self.at.isoformat().replace("+00:00", "Z"),
            "run_id": self.run_id,
            "data": self.data,
        }


@dataclass(frozen=True, kw_only=True)
class LoadStarted(Event):
    """A partition load began. data: trigger, generation (the one being written)."""

    type: ClassVar[str] = "load.started"


@dataclass(frozen=True, kw_only=True)
class LoadSucceeded(Event):
    """A partition now holds a new generation. data: trigger, generation, rows, fetched, rejected,
    duration_ms, first_load, previous_rows (when a generation was served before: a day emptied in
    the warehouse succeeds with rows 0)."""

    type: ClassVar[str] = "load.succeeded"


@dataclass(frozen=True, kw_only=True)
class LoadEmpty(Event):
    """The day is not ready, so nothing was written: no rows yet, or its `ready_query` said no.
    data: trigger, reason, source_rows."""

    type: ClassVar[str] = "load.empty"


@dataclass(frozen=True, kw_only=True)
class LoadFailed(Event):
    """A load failed; the previous generation stays. data: trigger, reason, transient, generation,
    serving (the generation still served, if any)."""

    type: ClassVar[str] = "load.failed"


@dataclass(frozen=True, kw_only=True)
class CheckChanged(Event):
    """A re-check found a loaded day changed. data: loaded_rows, rows, change_pct, fingerprint_changed."""

    type: ClassVar[str] = "check.changed"


@dataclass(frozen=True, kw_only=True)
class CheckHeld(Event):
    """A reload the daemon started on its own would remove more than the source's
    `hold_drop_pct` of a day's rows; the served generation stays until the user confirms with
    `ingestd load` or a `reload` request. data: loaded_rows, rows, drop_pct, confirm. Since API 2."""

    type: ClassVar[str] = "check.held"


@dataclass(frozen=True, kw_only=True)
class CheckUnchanged(Event):
    """A re-check found a loaded day unchanged. data: rows."""

    type: ClassVar[str] = "check.unchanged"


@dataclass(frozen=True, kw_only=True)
class SchemaChanged(Event):
    """A load or a re-check window's schema probe saw the source query's result schema differ
    from the one its last successful load stored. data: added and removed (`[{name, type}]`),
    retyped (`[{name, from, to}]`), mapped (the mapping keys whose columns were removed or
    retyped), blocking (loads fail: a mapped column removed, or retyped, when automatic loads
    fail until the user confirms), fix (what to do, when blocking), seen_by (`load` or
    `probe`), since_day (the day of the load that stored the earlier schema). Sent once per new
    schema. Since API 2."""

    type: ClassVar[str] = "schema.changed"


@dataclass(frozen=True, kw_only=True)
class BackfillAccepted(Event):
    """A backfill was stored. data: backfill_id, request_id, sources, from, to, days."""

    type: ClassVar[str] = "backfill.accepted"


@dataclass(frozen=True, kw_only=True)
class BackfillProgress(Event):
    """One day of a backfill finished. data: backfill_id, done, total, status."""

    type: ClassVar[str] = "backfill.progress"


@dataclass(frozen=True, kw_only=True)
class BackfillDone(Event):
    """A backfill finished. data: backfill_id, status (done|failed|cancelled), succeeded, failed."""

    type: ClassVar[str] = "backfill.done"


@dataclass(frozen=True, kw_only=True)
class DaemonStarted(Event):
    """The daemon is up. data: version, sources."""

    type: ClassVar[str] = "daemon.started"


@dataclass(frozen=True, kw_only=True)
class DaemonStopping(Event):
    """The daemon is shutting down. data: reason."""

    type: ClassVar[str] = "daemon.stopping"
