"""Status views: what the CLI, the bus's retained source states and the control layer show of
a source, read from the state store and the config."""

from __future__ import annotations

import datetime as dt

from ..core.config import Config
from ..core.query import DayWindow
from ..engine.planner import load_windows, recheck_windows
from ..engine.state import StateStore


async def source_status(config: Config, state: StateStore, name: str, days: int, now: dt.datetime) -> dict:
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
