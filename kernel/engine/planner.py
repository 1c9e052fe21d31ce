"""What a window does: which days a load window or a re-check window touches, and the
catch-up of days missed while the daemon was down."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator

from ..core import logs
from ..core.config import Config
from ..core.scheduler import CronWindows
from .drift import probe_schema
from .ingest import load_partition, recheck_day
from .lease import window_claim
from .runtime import Runtime, SourceGone

log = logs.get("ingestd.planner")


def load_windows(config: Config, source: str) -> CronWindows:
    src = config.sources[source]
    return CronWindows(src.schedule, src.timezone)


def recheck_windows(config: Config, source: str) -> CronWindows | None:
    src = config.sources[source]
    return CronWindows(src.recheck.schedule, src.timezone) if src.recheck.schedule else None


def newest_day(rt: Runtime, source: str, now: dt.datetime) -> dt.date | None:
    """The newest day due at `now`: the local date of the last load window, minus lag_days."""
    windows = load_windows(rt.config, source)
    last = windows.last_at_or_before(now)
    if last is None:
        return None
    return windows.local_date(last) - dt.timedelta(days=rt.config.sources[source].lag_days)


def lookback(rt: Runtime, source: str, newest: dt.date) -> list[dt.date]:
    n = rt.config.sources[source].recheck.lookback_days
    return [newest - dt.timedelta(days=i) for i in range(n - 1, -1, -1)]


async def run_load_window(rt: Runtime, source: str, now: dt.datetime) -> dict[dt.date, str]:
    """Load, oldest first, every day in the look-back range that holds no generation yet (and was
    not marked ready by the user) or whose last load failed: the newest day, any missed while the
    daemon was down, and retries.
    Days not landed stay for the next window. Each day's load takes its own job, so a reload
    during a window applies from the next day on; a source removed meanwhile ends the window."""
    done: dict[dt.date, str] = {}
    if source not in rt.config.sources or (newest := newest_day(rt, source, now)) is None:
        return done
    async with _claimed(rt, source, "load", now) as claimed:
        if not claimed:
            return done
        try:
            for day in lookback(rt, source, newest):
                if rt.stopping.is_set():
                    break
                part = await rt.state.partition(source, day)
                if part and (part.generation > 0 or part.ready_at) and part.status != "failed":
                    continue  # loaded (or marked ready by the user): re-checks watch it from now on
                async with rt.job(source) as job:
                    done[day] = (await load_partition(rt, job, day, "scheduled")).status
        except SourceGone:
            return done
        await rt.state.mark_window(source, "load", now)
    return done


async def run_recheck_window(rt: Runtime, source: str, now: dt.datetime) -> dict[dt.date, str]:
    """Probe the result schema once (on the newest day: schema drift, see engine/drift.py), then
    every day in the look-back range; reload the changed ones."""
    done: dict[dt.date, str] = {}
    if source not in rt.config.sources:
        return done
    newest = newest_day(rt, source, now)
    async with _claimed(rt, source, "recheck", now) as claimed:
        if not claimed:
            return done
        try:
            if newest is not None:
                async with rt.job(source) as job:
                    await probe_schema(rt, job, newest)
                for day in lookback(rt, source, newest):
                    if rt.stopping.is_set():
                        break
                    async with rt.job(source) as job:
                        done[day] = await recheck_day(rt, job, day)
        except SourceGone:
            return done
        await rt.state.mark_window(source, "recheck", now)
    return done


@contextlib.asynccontextmanager
async def _claimed(rt: Runtime, source: str, kind: str, now: dt.datetime) -> AsyncIterator[bool]:
    """The window of `kind` due at `now`, claimed for this replica (engine/lease.py); always
    granted with the embedded store."""
    windows = load_windows(rt.config, source) if kind == "load" else recheck_windows(rt.config, source)
    due = windows.last_at_or_before(now) if windows is not None else None
    async with window_claim(rt, source, kind, due or now) as claimed:
        yield claimed


async def window_due(rt: Runtime, source: str, kind: str, now: dt.datetime) -> bool:
    """Whether a `kind` ("load" or "recheck") window of `source` fell due since one last ran."""
    if source not in rt.config.sources:
        return False
    windows = load_windows(rt.config, source) if kind == "load" else recheck_windows(rt.config, source)
    if windows is None:
        return False
    last = windows.last_at_or_before(now)
    seen = await rt.state.window_seen(source, kind)
    return last is not None and (seen is None or last > seen)


async def run_due(rt: Runtime, source: str, now: dt.datetime) -> dict[str, dict[dt.date, str]]:
    """What fell due for a source since its windows last ran (`ingestd run --once`, and the daemon
    at start and for sources a reload adds or changes): the load window with its catch-up of
    missed days, then the re-check window. A window that ran already is not run again."""
    out: dict[str, dict[dt.date, str]] = {}
    if await window_due(rt, source, "load", now):
        out["load"] = await run_load_window(rt, source, now)
    if await window_due(rt, source, "recheck", now):
        out["recheck"] = await run_recheck_window(rt, source, now)
    return out
