"""Backfills: stored durably first, then run oldest day first with bounded concurrency,
resumable after a kill. The same request id twice runs once."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
from collections.abc import Awaitable, Callable

from ..core import logs
from ..core.errors import IngestdError
from ..core.events import BackfillAccepted, BackfillDone, BackfillProgress, Event
from .ingest import Outcome, load_day
from .lease import renewing
from .runtime import Runtime, SourceGone, event
from .state import Backfill

log = logs.get("ingestd.backfill")


MAX_REQUEST_ID = 128
BUSY_RETRY_SECONDS = 1.0
Record = Callable[[str, dt.date, Outcome], Awaitable[None]]


class BackfillRejected(IngestdError):
    """The request is invalid; nothing was stored."""


def resolve_sources(rt: Runtime, source: str | list[str]) -> list[str]:
    names = sorted(rt.config.sources) if source in ("*", ["*"]) else ([source] if isinstance(source, str) else source)
    unknown = [n for n in names if n not in rt.config.sources]
    if unknown:
        raise BackfillRejected(f"unknown source {unknown[0]!r} (configured: {', '.join(sorted(rt.config.sources))})")
    if not names:
        raise BackfillRejected("no source named")
    return names


async def submit(rt: Runtime, source: str | list[str], first: dt.date, last: dt.date, *,
                 request_id: str | None = None, origin: str = "cli", missing: bool = False) -> tuple[Backfill, bool]:
    """Store a backfill of `source` (a name, names, or "*") from `first` to `last`. With `missing`,
    only the days never loaded, failed or emptied are stored; the others count as skipped."""
    sources = resolve_sources(rt, source)
    if request_id is not None and not (0 < len(request_id) <= MAX_REQUEST_ID and request_id.isprintable()):
        shown = ascii(request_id)[:60]
        raise BackfillRejected(f"request_id must be 1 to {MAX_REQUEST_ID} printable characters, got {shown}")
    if first > last:
        raise BackfillRejected(f"from {first} is after to {last}")
    span = (last - first).days + 1
    if span > rt.config.daemon.max_backfill_days:
        raise BackfillRejected(f"range of {span} days is longer than max_backfill_days "
                               f"({rt.config.daemon.max_backfill_days})")
    only = None
    if missing:
        loaded = {(s, p.day) for s in sources for p in await rt.state.partitions(s, first, last)
                  if p.generation > 0 and p.status not in ("failed", "emptied")}
        only = lambda s, d: (s, d) not in loaded  # noqa: E731
    return await rt.state.create_backfill(
        sources, first, last, request_id=request_id, origin=origin, only=only, missing=missing,
        events=lambda b, total: [event(BackfillAccepted, None, None, None, backfill_id=b.id, request_id=request_id,
                                       sources=sources, **{"from": first.isoformat(), "to": last.isoformat()},
                                       days=total, skipped=b.skipped)])


async def run(rt: Runtime, backfill_id: int,
              on_progress: Callable[[int, int, str, dt.date, str], None] | None = None) -> str:
    """Run the pending days of a backfill, oldest first; returns its final status. With replicas,
    each day is claimed first (`claim_backfill_day`), so the replicas share the days."""

    async def record(source: str, day: dt.date, outcome: Outcome) -> None:
        def progress(done: int, total: int) -> list[Event]:
            if on_progress:
                on_progress(done, total, source, day, outcome.status)
            rt.activity[f"backfill/{backfill_id}"] = f"backfill {done}/{total}"
            return [event(BackfillProgress, source, day, outcome.run_id, backfill_id=backfill_id, done=done,
                          total=total, status=outcome.status)]

        await rt.state.finish_backfill_day(backfill_id, source, day, outcome.status, outcome.run_id, progress)

    if rt.shared:
        await _run_claimed(rt, backfill_id, record)
    else:
        await _run_local(rt, backfill_id, record)
    rt.activity.pop(f"backfill/{backfill_id}", None)
    current = await rt.state.backfill(backfill_id)
    if current is None or current.status == "cancelled":
        return "cancelled"
    if await rt.state.backfill_days(backfill_id, "pending"):
        return "running"  # stopped early; resumes at the next start
    days = await rt.state.backfill_days(backfill_id)
    failed = sum(1 for d in days if d[2] == "failed")
    status = "failed" if failed else "done"
    await rt.state.finish_backfill(backfill_id, status, [event(
        BackfillDone, None, None, None, backfill_id=backfill_id, status=status,
        succeeded=sum(1 for d in days if d[2] == "succeeded"), emptied=sum(1 for d in days if d[2] == "emptied"),
        empty=sum(1 for d in days if d[2] == "empty"), failed=failed, skipped=current.skipped)])
    return status


async def _load(rt: Runtime, backfill_id: int, source: str, day: dt.date) -> Outcome:
    try:
        return await load_day(rt, source, day, "backfill", backfill_id=backfill_id)
    except SourceGone as exc:
        return Outcome("failed", reason=str(exc))


async def _run_local(rt: Runtime, backfill_id: int, record: Record) -> None:
    """The embedded store: this process runs every pending day, `max_concurrent_loads` at once."""
    pending = await rt.state.backfill_days(backfill_id, "pending")
    limit = asyncio.Semaphore(rt.config.daemon.max_concurrent_loads)

    async def one(source: str, day: dt.date) -> None:
        try:
            current = await rt.state.backfill(backfill_id)
            if current is None or current.status == "cancelled" or rt.stopping.is_set():
                return
            await record(source, day, await _load(rt, backfill_id, source, day))
        finally:
            limit.release()

    async with asyncio.TaskGroup() as group:
        for source, day, _ in pending:
            await limit.acquire()
            if rt.stopping.is_set():
                limit.release()
                break
            group.create_task(one(source, day))


async def _run_claimed(rt: Runtime, backfill_id: int, record: Record) -> None:
    """Replicas: `max_concurrent_loads` workers each claim the oldest unclaimed day (a claim
    renewed while its load runs, and lapsing if this replica dies) until none is left."""

    async def worker() -> None:
        while not rt.stopping.is_set():
            current = await rt.state.backfill(backfill_id)
            if current is None or current.status != "running":
                return
            claimed = await rt.state.claim_backfill_day(backfill_id, rt.lease_seconds)
            if claimed is None:
                return
            source, day = claimed
            # A lapsed claim lets another replica take the day; its load is leased, so never concurrent.
            renew = functools.partial(rt.state.renew_backfill_day, backfill_id, source, day, rt.lease_seconds)
            async with renewing(rt, "backfill_day", renew, backfill_id=backfill_id, source=source,
                                day=day.isoformat()):
                outcome = await _load(rt, backfill_id, source, day)
                while outcome.status == "busy" and not rt.stopping.is_set():
                    await asyncio.sleep(BUSY_RETRY_SECONDS)  # the day's own window is loading it now
                    outcome = await _load(rt, backfill_id, source, day)
            if outcome.status not in ("busy", "fenced"):  # fenced: the replica that took the day over records it
                await record(source, day, outcome)

    async with asyncio.TaskGroup() as group:
        for _ in range(rt.config.daemon.max_concurrent_loads):
            group.create_task(worker())


async def cancel(rt: Runtime, backfill_id: int) -> bool:
    current = await rt.state.backfill(backfill_id)
    if current is None or current.status != "running":
        return False
    await rt.state.finish_backfill(backfill_id, "cancelled", [event(
        BackfillDone, None, None, None, backfill_id=backfill_id, status="cancelled")])
    return True
