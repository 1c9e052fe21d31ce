"""Status views: what the CLI, the bus's retained source states and the control layer show of
a source, read from the state store and the config."""

from __future__ import annotations

import datetime as dt
from typing import Any
from zoneinfo import ZoneInfo

from ..core.config import Config
from ..engine.planner import load_windows, recheck_windows
from ..engine.state import Backfill, PartitionRow, RunRow, StateStore, StoredSchema


def local_today(now: dt.datetime, timezone: str) -> dt.date:
    return now.astimezone(ZoneInfo(timezone)).date()


def day_view(day: dt.date, part: PartitionRow | None, run: RunRow | None) -> dict[str, Any]:
    """One day as the status shows it: what is served, what is loading, the last attempt."""
    serving = ({"generation": part.generation, "rows": part.rows, "loaded_at": part.loaded_at}
               if part and part.generation > 0 else None)
    loading = ({"generation": run.generation, "rows_so_far": run.rows_fetched or 0, "started_at": run.started_at,
                "trigger": run.trigger, "run_id": run.run_id} if run and run.status == "running" else None)
    last = ({"run_id": run.run_id, "trigger": run.trigger, "status": run.status, "reason": run.reason,
             "rows_written": run.rows_written, "started_at": run.started_at, "finished_at": run.finished_at,
             "first_load": run.first_load} if run else None)
    status = part.status if part else ("loading" if loading else "unknown")
    held = ({"loaded_rows": part.source_rows if part.source_rows is not None else part.rows,
             "rows": part.held_rows} if part and part.status == "held" else None)
    if loading:
        state = "loading"
    elif status in ("held", "failed", "emptied", "empty"):
        state = status
    elif part and part.generation > 0:
        state = "reloaded" if part.generation > 1 else "loaded"
    else:
        state = "missing"
    return {
        "day": day.isoformat(), "state": state, "status": status, "summary": _summary(state, serving, loading, part),
        "rows": part.rows if part else None, "generation": part.generation if part else 0,
        "loaded_at": part.loaded_at if part else None, "checked_at": part.checked_at if part else None,
        "error": part.error if part else None, "ready_at": part.ready_at if part else None,
        "serving": serving, "loading": loading, "held": held, "last_run": last,
    }


def _summary(state: str, serving: dict[str, Any] | None, loading: dict[str, Any] | None,
             part: PartitionRow | None) -> str:
    parts = []
    if loading:
        parts.append(f"loading gen {loading['generation']} ({loading['rows_so_far']:,} rows so far)")
    if serving:
        parts.append(f"serving gen {serving['generation']}, {serving['rows'] or 0:,} rows")
    elif not loading:
        parts.append("nothing served")
    if part and state in ("failed", "held") and part.error:
        parts.append(("last attempt failed: " if state == "failed" else "") + part.error)
    return "; ".join(parts)


def schema_view(stored: StoredSchema | None) -> dict[str, Any] | None:
    """The source's stored result schema (of its last successful load) and the last change seen:
    `pending` while the changed schema has not been taken by a successful load yet, `blocking`
    when it fails automatic loads (a mapped column removed or retyped)."""
    if stored is None:
        return None
    change = None
    if stored.change:
        change = {**stored.change, "at": stored.changed_at, "pending": stored.seen is not None}
    return {"columns": [{"name": c["name"], "type": c["type"]} for c in stored.columns],
            "day": stored.day.isoformat(), "stored_at": stored.stored_at, "change": change}


async def source_status(config: Config, state: StateStore, name: str, days: int, now: dt.datetime) -> dict[str, Any]:
    """A source's windows, its last run and loaded day (whatever their age), and its last `days`
    days (today, in its time zone, and the days before) with what each serves and runs."""
    src = config.sources[name]
    lw, rw = load_windows(config, name), recheck_windows(config, name)
    today = local_today(now, src.timezone)
    first = today - dt.timedelta(days=days)
    parts = {p.day: p for p in await state.partitions(name, first, today)}
    runs = await state.latest_runs(name, first, today)
    last = await state.last_run(name)
    last_loaded = await state.last_loaded_day(name)
    return {
        "source": name, "kind": src.kind, "connection": src.connection, "timezone": src.timezone,
        "next_load": lw.next_after(now).isoformat(),
        "next_recheck": rw.next_after(now).isoformat() if rw else None,
        "last_status": last.status if last else None,
        "last_loaded_day": last_loaded.isoformat() if last_loaded else None,
        "loading": [{"day": r.day.isoformat(), "generation": r.generation, "rows_so_far": r.rows_fetched or 0,
                     "trigger": r.trigger, "run_id": r.run_id, "started_at": r.started_at}
                    for r in await state.running_runs() if r.source == name],
        "days": [day_view(d, parts.get(d), runs.get(d)) for d in sorted(set(parts) | set(runs), reverse=True)],
        "schema": schema_view(await state.result_schema(name)),
    }


async def status_report(config: Config, state: StateStore, names: list[str], days: int,
                        now: dt.datetime) -> dict[str, Any]:
    """Every named source's status and the running backfills: what `ingestd status --json` and
    the `status` request show; with a shared state store, also the replicas alive now (daemons,
    not CLI commands) with their last heartbeat."""
    report: dict[str, Any] = {
        "sources": [await source_status(config, state, n, days, now) for n in names],
        "backfills": [await backfill_view(state, b) for b in await state.backfills("running")],
    }
    if state.shared:
        report["replicas"] = [{"replica": r.replica, "host": r.host, "pid": r.pid,
                               "started_at": r.started_at.isoformat(), "seen_at": r.seen_at.isoformat()}
                              for r in await state.live_replicas() if ".cli-" not in r.replica]
    return report


async def backfill_view(state: StateStore, b: Backfill) -> dict[str, Any]:
    """A backfill with its progress: source-days `done` of `total`, `failed`, rows written."""
    p = await state.backfill_progress(b.id)
    return {"id": b.id, "sources": b.sources, "from": str(b.day_from), "to": str(b.day_to), "status": b.status,
            "created_at": b.created_at, "done": p["done"], "total": p["total"], "failed": p.get("failed", 0),
            "rows": p["rows"], "rows_fetched": p["rows_fetched"]}


def run_view(run: RunRow, rejects: dict[str, Any] | None) -> dict[str, Any]:
    """One run as the status page shows it."""
    return {"run_id": run.run_id, "trigger": run.trigger, "status": run.status, "generation": run.generation,
            "rows_fetched": run.rows_fetched, "rows_written": run.rows_written, "rows_rejected": run.rows_rejected,
            "started_at": run.started_at, "finished_at": run.finished_at, "duration_ms": run.duration_ms,
            "reason": run.reason, "backfill_id": run.backfill_id, "first_load": run.first_load,
            "rejects": (rejects or {}).get("reasons", {}), "reject_samples": (rejects or {}).get("samples", [])}


async def calendar_report(config: Config, state: StateStore, names: list[str], days: int,
                          now: dt.datetime) -> dict[str, Any]:
    """The status page's data: per source its last `days` days (today last), every day (also one
    never touched, as `missing`) with its state and latest runs, the running loads and windows;
    the running backfills with their progress."""
    report = await status_report(config, state, names, days - 1, now)
    for s in report["sources"]:
        today = local_today(now, s["timezone"])
        first = today - dt.timedelta(days=days - 1)
        known = {d["day"]: d for d in s["days"]}
        runs = await state.runs_of(s["source"], first, today)
        rejects = await state.run_rejects([r.run_id for rs in runs.values() for r in rs if r.rows_rejected])
        cells = []
        for i in range(days):
            day = first + dt.timedelta(days=i)
            view = known.get(day.isoformat()) or day_view(day, None, None)
            view["runs"] = [run_view(r, rejects.get(r.run_id)) for r in runs.get(day, [])]
            view["weekday"] = day.isoweekday()
            cells.append(view)
        s["calendar"] = cells
        s["today"] = today.isoformat()
    return report


async def retained_source_state(config: Config, state: StateStore, name: str, now: dt.datetime) -> dict[str, Any]:
    """The bus's retained `source/<name>/state`: last loaded day (whatever its age), last status,
    next windows, and the days loading now."""
    s = await source_status(config, state, name, 0, now)
    return {k: s[k] for k in ("source", "last_loaded_day", "last_status", "next_load", "next_recheck", "loading")}
