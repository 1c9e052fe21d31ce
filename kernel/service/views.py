"""Status views: what the CLI, the bus's retained source states and the control layer show of
a source, read from the state store and the config."""

from __future__ import annotations

import datetime as dt
from typing import Any

from ..core.config import Config
from ..core.query import DayWindow
from ..engine.planner import load_windows, recheck_windows
from ..engine.state import StateStore


async def source_status(config: Config, state: StateStore, name: str, days: int, now: dt.datetime) -> dict[str, Any]:
    src = config.sources[name]
    lw, rw = load_windows(config, name), recheck_windows(config, name)
    today = DayWindow.of(now.date(), src.timezone).day
    parts = await state.partitions(name, today - dt.timedelta(days=days), today)
    last = await state.last_run(name)
    return {
        "source": name, "kind": src.kind, "connection": src.connection, "timezone": src.timezone,
        "next_load": lw.next_after(now).isoformat(),
        "next_recheck": rw.next_after(now).isoformat() if rw else None,
        "last_status": last.status if last else None,
        "last_loaded_day": max((p.day for p in parts if p.generation > 0), default=None),
        "days": [{"day": p.day.isoformat(), "status": p.status, "rows": p.rows, "generation": p.generation,
                  "loaded_at": p.loaded_at, "checked_at": p.checked_at, "error": p.error}
                 for p in reversed(parts)],
    }


async def status_report(config: Config, state: StateStore, names: list[str], days: int,
                        now: dt.datetime) -> dict[str, Any]:
    """Every named source's status and the running backfills: what `ingestd status --json` and
    the `status` request show."""
    return {
        "sources": [await source_status(config, state, n, days, now) for n in names],
        "backfills": [{"id": b.id, "sources": b.sources, "from": str(b.day_from), "to": str(b.day_to),
                       "status": b.status} for b in await state.backfills("running")],
    }


async def retained_source_state(config: Config, state: StateStore, name: str, now: dt.datetime) -> dict[str, Any]:
    """The bus's retained `source/<name>/state`: last loaded day (whatever its age), last status,
    next windows."""
    s = await source_status(config, state, name, 0, now)
    payload = {k: s[k] for k in ("source", "last_loaded_day", "last_status", "next_load", "next_recheck")}
    loaded = [p.day for p in await state.partitions(name) if p.generation > 0]
    payload["last_loaded_day"] = max(loaded).isoformat() if loaded else None
    return payload
