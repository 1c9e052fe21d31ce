"""One partition job: probe -> fetch -> map -> sink.replace -> state -> events.

Fetch, mapping and the sink write run as overlapping stages joined by small queues, so the
slowest stage sets the pace and memory holds only a few batches. A transient connector error
retries the whole attempt with backoff; the sink keeps the previous generation until the new
one is complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import pyarrow as pa

from ..core import logs
from ..core.config import DaemonSection
from ..core.contracts import ProbeResult, Target, aclosing_stream
from ..core.errors import IngestdError, PermanentError, RejectLimitExceeded, TransientError
from ..core.events import CheckChanged, CheckUnchanged, LoadEmpty, LoadFailed, LoadStarted, LoadSucceeded
from ..core.schema import RowMapper
from .job import Job
from .runtime import Runtime, event
from .slices import fetch_slices

log = logs.get("ingestd.ingest")
T = TypeVar("T")
QUEUE_DEPTH = 2


@dataclass(frozen=True)
class Outcome:
    status: str  # succeeded | empty | failed
    run_id: str | None = None
    generation: int | None = None
    rows: int = 0
    reason: str | None = None


async def with_retry(d: DaemonSection, what: str, call: Callable[[], Awaitable[T]], **ctx: Any) -> T:
    """Run `call`, retrying TransientError with exponential backoff and jitter (the `retry_*`
    settings of `[daemon]`)."""
    for attempt in range(1, d.retry_attempts + 1):
        try:
            return await call()
        except TransientError as exc:
            if attempt == d.retry_attempts:
                raise
            delay = min(d.retry_max_seconds, d.retry_base_seconds * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            log.warning(f"{what}.retry", attempt=attempt, delay_s=round(delay, 2), error=str(exc), **ctx)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


async def probe(job: Job, day: dt.date) -> ProbeResult:
    query = job.day_query(day)
    return await with_retry(job.daemon, "probe", lambda: job.connector.probe(query, job.info),
                            source=job.source, day=day.isoformat())


async def is_ready(job: Job, day: dt.date, found: ProbeResult) -> bool:
    """A day is ready when it has rows, unless a `ready_query` says otherwise (its first value,
    as a row count or boolean, decides)."""
    if not job.config.ready_query:
        return found.rows > 0
    q = job.day_query(day, job.config.ready_query)
    result = await with_retry(job.daemon, "ready", lambda: job.connector.probe(q, job.info))
    return result.rows > 0 and found.rows > 0


async def load_day(rt: Runtime, source: str, day: dt.date, trigger: str, **kw: Any) -> Outcome:
    """`load_partition` on a job of `source` taken now."""
    async with rt.job(source) as job:
        return await load_partition(rt, job, day, trigger, **kw)


async def load_partition(rt: Runtime, job: Job, day: dt.date, trigger: str, *,
                         backfill_id: int | None = None, found: ProbeResult | None = None) -> Outcome:
    """Load one day of one source and replace it in the sink, exactly once, atomically."""
    source = job.source
    async with rt.partition_lock(source, day), rt.slots:
        rt.activity[f"{source}/{day}"] = f"loading {source} {day}"
        try:
            return await _load(rt, job, day, trigger, backfill_id, found)
        finally:
            rt.activity.pop(f"{source}/{day}", None)


async def _load(rt: Runtime, job: Job, day: dt.date, trigger: str, backfill_id: int | None,
                found: ProbeResult | None) -> Outcome:
    source, src, sink = job.source, job.config, job.sink
    started = time.monotonic()
    part = await rt.state.partition(source, day)
    try:
        if found is None:
            found = await probe(job, day)
        ready = await is_ready(job, day, found)
    except Exception as exc:  # every failure is recorded as a run, with its reason
        return await _fail_without_run(rt, source, day, trigger, backfill_id, exc, started)
    if not ready:
        run_id = await rt.state.start_run(source, day, trigger, part.generation if part else 0, backfill_id,
                                          lambda rid: [])
        fields: dict[str, Any] = {"checked_at": dt.datetime.now(dt.UTC).isoformat()}
        if not part or part.generation == 0:
            fields.update(status="empty", rows=0, source_rows=0)
        await rt.state.finish_run(run_id, status="empty", rows_fetched=0, rows_written=0, rows_rejected=0,
                                  duration_ms=_ms(started), partition=fields,
                                  events=[event(LoadEmpty, source, day, run_id, trigger=trigger)])
        return Outcome("empty", run_id, part.generation if part else None)
    visible = await sink.read_generation(src.kind, source, day)
    generation = max(part.generation if part else 0, visible.generation if visible else 0) + 1
    run_id = await rt.state.start_run(
        source, day, trigger, generation, backfill_id,
        lambda rid: [event(LoadStarted, source, day, rid, trigger=trigger, generation=generation)])
    failed: dict[str, Any] = {}  # the counts of the last attempt, when it fails
    try:
        stats = await with_retry(
            job.daemon, "load", lambda: _stream(job, day, generation, failed),
            source=source, day=day.isoformat(), run_id=run_id, generation=generation)
    except (Exception, asyncio.CancelledError) as exc:  # every failure is recorded on the run, with its reason
        transient = isinstance(exc, (TransientError, asyncio.CancelledError))
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, asyncio.CancelledError):
            reason = "cancelled: the daemon stopped before the load finished; the previous generation was kept"
        elif not isinstance(exc, (TransientError, PermanentError, RejectLimitExceeded)):
            log.error("load.error", source=source, day=day.isoformat(), run_id=run_id, exc_info=exc)
            reason = f"{type(exc).__name__}: {reason}"
        stats = failed
        await rt.state.finish_run(
            run_id, status="failed", reason=reason, duration_ms=_ms(started), partition={
                "status": "failed", "error": reason, "checked_at": dt.datetime.now(dt.UTC).isoformat()},
            rows_fetched=stats.get("fetched"), rows_rejected=stats.get("rejected"), rejects=stats.get("reasons"),
            samples=stats.get("samples"),
            events=[event(LoadFailed, source, day, run_id, trigger=trigger, reason=reason, transient=transient,
                          generation=generation)])
        if isinstance(exc, asyncio.CancelledError):
            raise
        return Outcome("failed", run_id, generation, reason=reason)
    duration = _ms(started)
    now = dt.datetime.now(dt.UTC).isoformat()
    await rt.state.finish_run(
        run_id, status="succeeded", rows_fetched=stats["fetched"], rows_written=stats["written"],
        rows_rejected=stats["rejected"], rejects=stats["reasons"], samples=stats["samples"],
        fingerprint=found.fingerprint, duration_ms=duration,
        partition={"status": "succeeded", "generation": generation, "rows": stats["written"],
                   "source_rows": stats["fetched"], "fingerprint": found.fingerprint, "loaded_at": now,
                   "checked_at": now, "error": None},
        events=[event(LoadSucceeded, source, day, run_id, trigger=trigger, generation=generation,
                      rows=stats["written"], fetched=stats["fetched"], rejected=stats["rejected"],
                      duration_ms=duration)])
    return Outcome("succeeded", run_id, generation, stats["written"])


async def _fail_without_run(rt: Runtime, source: str, day: dt.date, trigger: str, backfill_id: int | None,
                            exc: Exception, started: float) -> Outcome:
    part = await rt.state.partition(source, day)
    reason = str(exc) if isinstance(exc, IngestdError) else f"{type(exc).__name__}: {exc}"
    if not isinstance(exc, IngestdError):
        log.error("probe.error", source=source, day=day.isoformat(), exc_info=exc)
    run_id = await rt.state.start_run(source, day, trigger, part.generation if part else 0, backfill_id, lambda rid: [])
    await rt.state.finish_run(
        run_id, status="failed", reason=reason, duration_ms=_ms(started),
        partition={"status": "failed", "error": reason} if not part or part.generation == 0 else {"error": reason},
        events=[event(LoadFailed, source, day, run_id, trigger=trigger, reason=reason,
                      transient=isinstance(exc, TransientError))])
    return Outcome("failed", run_id, reason=reason)


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


_DONE = object()


async def _stream(job: Job, day: dt.date, generation: int, failed: dict[str, Any]) -> dict[str, Any]:
    """One attempt: fetch, map and write overlapping; returns counts. Raises on any failure,
    after which the sink still holds the previous generation and `failed` the attempt's counts."""
    failed.clear()
    source, src, conn = job.source, job.config, job.connector
    query = job.day_query(day)
    mapper = RowMapper(src.kind, src.mapping, query.window, source=source, generation=generation,
                       ingested_at=dt.datetime.now(dt.UTC))
    # One thread per load maps batches in order; closing the mapper on that thread waits for a
    # mapping still running when the load is cancelled.
    loop = asyncio.get_running_loop()
    map_thread = ThreadPoolExecutor(1, thread_name_prefix="ingestd-map")
    # Each queue carries batches, then _DONE or the exception that ended its stage.
    fetched_q: asyncio.Queue[object] = asyncio.Queue(QUEUE_DEPTH)
    mapped_q: asyncio.Queue[object] = asyncio.Queue(QUEUE_DEPTH)
    stats: dict[str, Any] = {"fetched": 0, "rejected": 0, "written": 0, "reasons": Counter(), "samples": []}

    async def fetch_stage() -> None:
        try:
            stream = (fetch_slices(job, day) if src.slices > 1
                      else conn.fetch(query, job.batch_rows, job.info))
            async with aclosing_stream(stream) as stream:
                async for batch in stream:
                    stats["fetched"] += batch.num_rows
                    await fetched_q.put(batch)
            await fetched_q.put(_DONE)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            await fetched_q.put(exc)
            raise

    async def map_stage() -> None:
        try:
            while (item := await fetched_q.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                mapped = await loop.run_in_executor(map_thread, mapper.map, item)
                stats["rejected"] += sum(mapped.rejects.values())
                stats["reasons"].update(mapped.rejects)
                stats["samples"].extend(mapped.samples)
                if mapped.rows.num_rows:
                    await mapped_q.put(mapped.rows)
            await mapped_q.put(_DONE)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            await mapped_q.put(exc)
            raise

    async def batches() -> AsyncIterator[pa.RecordBatch]:
        while (item := await mapped_q.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
        if stats["fetched"] and stats["rejected"] * 100 / stats["fetched"] > src.max_reject_pct:
            top = ", ".join(f"{k}: {v}" for k, v in stats["reasons"].most_common(5))
            exc = RejectLimitExceeded(
                f"{stats['rejected']} of {stats['fetched']} rows rejected "
                f"({stats['rejected'] * 100 / stats['fetched']:.2f}%), more than max_reject_pct "
                f"{src.max_reject_pct}% ({top})")
            raise exc

    tasks = [asyncio.create_task(fetch_stage()), asyncio.create_task(map_stage())]
    try:
        target = Target(src.kind, source, day, generation)
        stats["written"] = await job.sink.replace(target, batches())
        await asyncio.gather(*tasks)
    except BaseException:
        failed.update(stats, reasons=dict(stats["reasons"]))
        raise
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        try:
            await asyncio.shield(loop.run_in_executor(map_thread, mapper.close))
        finally:
            map_thread.shutdown(wait=False)
    stats["reasons"] = dict(stats["reasons"])
    return stats


async def recheck_day(rt: Runtime, job: Job, day: dt.date) -> str:
    """Probe a day again; reload it if its count moved past the threshold or (checksum mode)
    its fingerprint changed. Downloads no rows for an unchanged day. Returns what it did."""
    source, src = job.source, job.config
    part = await rt.state.partition(source, day)
    try:
        found = await probe(job, day)
    except (TransientError, PermanentError) as exc:
        log.warning("check.failed", source=source, day=day.isoformat(), error=str(exc))
        return "failed"
    if part is None or part.generation == 0:
        if found.rows > 0:
            out = await load_partition(rt, job, day, "recheck", found=found)
            return "loaded" if out.status == "succeeded" else out.status
        first_seen: dict[str, Any] = {} if part else {"status": "empty", "rows": 0, "source_rows": 0}
        await rt.state.set_partition(source, day, checked_at=dt.datetime.now(dt.UTC).isoformat(), **first_seen)
        return "empty"
    loaded = part.source_rows if part.source_rows is not None else (part.rows or 0)
    change_pct = abs(found.rows - loaded) * 100 / loaded if loaded else (100.0 if found.rows else 0.0)
    caps = job.connector.capabilities
    fp_changed = (src.recheck.detect == "checksum" and caps.fingerprint and found.fingerprint is not None
                  and found.fingerprint != part.fingerprint)
    now = dt.datetime.now(dt.UTC).isoformat()
    if change_pct > src.recheck.threshold_pct or fp_changed:
        await rt.state.set_partition(source, day, checked_at=now, events=[event(
            CheckChanged, source, day, None, loaded_rows=loaded, rows=found.rows,
            change_pct=round(change_pct, 3), fingerprint_changed=fp_changed)])
        out = await load_partition(rt, job, day, "recheck", found=found)
        return "reloaded" if out.status == "succeeded" else out.status
    await rt.state.set_partition(source, day, checked_at=now, events=[event(
        CheckUnchanged, source, day, None, rows=found.rows, change_pct=round(change_pct, 3))])
    return "unchanged"


async def recover(rt: Runtime) -> list[str]:
    """Settle runs left `running` by a killed process, from what the sink really holds."""
    settled = []
    for run in await rt.state.running_runs():
        if run.source not in rt.config.sources:
            await rt.state.finish_run(run.run_id, status="failed", reason="interrupted; source no longer configured")
            continue
        kind = rt.config.sources[run.source].kind
        info = await rt.sink_of(run.source).read_generation(kind, run.source, run.day)
        if info and run.generation and info.generation == run.generation:
            now = dt.datetime.now(dt.UTC).isoformat()
            await rt.state.finish_run(
                run.run_id, status="succeeded", reason="completed before the process stopped; settled at restart",
                rows_written=info.rows, partition={"status": "succeeded", "generation": info.generation,
                                                   "rows": info.rows, "source_rows": info.rows, "loaded_at": now,
                                                   "error": None},
                events=[event(LoadSucceeded, run.source, run.day, run.run_id, trigger=run.trigger,
                              generation=info.generation, rows=info.rows, recovered=True)])
        else:
            reason = "interrupted: the process stopped during the load; the previous generation was kept"
            await rt.state.finish_run(
                run.run_id, status="failed", reason=reason, partition={"status": "failed", "error": reason},
                events=[event(LoadFailed, run.source, run.day, run.run_id, trigger=run.trigger, reason=reason,
                              transient=True)])
        settled.append(run.run_id)
    return settled
