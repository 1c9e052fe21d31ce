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
import decimal
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
from ..core.errors import FencedOut, IngestdError, PermanentError, RejectLimitExceeded, TransientError
from ..core.events import CheckChanged, CheckHeld, CheckUnchanged, LoadEmpty, LoadFailed, LoadStarted, LoadSucceeded
from ..core.schema import RowMapper
from . import drift
from .job import Job
from .lease import Lease, partition_lease
from .runtime import Runtime, SinkUnavailable, event
from .slices import fetch_slices
from .state import PartitionRow, RunRow

log = logs.get("ingestd.ingest")
T = TypeVar("T")
QUEUE_DEPTH = 2


@dataclass(frozen=True)
class Outcome:
    status: str  # succeeded | emptied | empty | held | failed | busy (another replica holds the day)
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


AUTOMATIC = frozenset({"scheduled", "recheck"})
"""Triggers the daemon starts on its own; `hold_drop_pct` holds their large drops. A manual load,
a ready signal or a backfill is the user's word, and is never held."""


def readiness(value: Any) -> bool:
    """`ready_query`'s first value: a boolean as such, a number when > 0, NULL (or no row) no.
    Text holding a boolean or a number is read the same way; anything else is an error."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float, decimal.Decimal)):
        return value > 0
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("true", "t", "yes", "y"):
            return True
        if word in ("false", "f", "no", "n", ""):
            return False
        try:
            return float(word) > 0
        except ValueError:
            pass
    raise PermanentError(f"ready_query's first value is {value!r} ({type(value).__name__}): it must be a boolean, "
                         "a number (ready when > 0) or NULL (not ready)")


async def ready_answer(job: Job, day: dt.date) -> bool:
    """Run the source's `ready_query` for `day` and read its first value (`readiness`)."""
    query = job.day_query(day, job.config.ready_query)

    async def first_value() -> Any:
        async with aclosing_stream(job.connector.fetch(query, 1, job.info)) as stream:
            async for batch in stream:
                if batch.num_rows and batch.num_columns:
                    return batch.column(0)[0].as_py()
        return None

    return readiness(await with_retry(job.daemon, "ready", first_value, source=job.source, day=day.isoformat()))


async def load_day(rt: Runtime, source: str, day: dt.date, trigger: str, **kw: Any) -> Outcome:
    """`load_partition` on a job of `source` taken now; a failed outcome, with no run recorded,
    while the source's sink cannot be opened."""
    try:
        async with rt.job(source) as job:
            return await load_partition(rt, job, day, trigger, **kw)
    except SinkUnavailable as exc:
        return Outcome("failed", reason=str(exc))


async def load_partition(rt: Runtime, job: Job, day: dt.date, trigger: str, *,
                         backfill_id: int | None = None, found: ProbeResult | None = None) -> Outcome:
    """Load one day of one source and replace it in the sink, exactly once, atomically. With
    replicas, under the day's lease (engine/lease.py): `busy` when another replica holds it."""
    source = job.source
    async with rt.partition_lock(source, day), rt.slots, partition_lease(rt, source, day) as lease:
        if lease is None:
            return Outcome("busy", reason="another replica is loading this day")
        if lease.token is not None and trigger == "scheduled" and await _loaded_meanwhile(rt, source, day):
            return Outcome("skipped", reason="another replica loaded this day meanwhile")
        rt.activity[f"{source}/{day}"] = f"loading {source} {day}"
        try:
            return await _load(rt, job, day, trigger, backfill_id, found, lease)
        except FencedOut as exc:
            return await _fenced(rt, source, day, lease, exc)
        finally:
            rt.activity.pop(f"{source}/{day}", None)


async def _loaded_meanwhile(rt: Runtime, source: str, day: dt.date) -> bool:
    """Whether the day holds a generation now (read under its lease): a window that saw it
    unloaded may have waited while another replica loaded it."""
    part = await rt.state.partition(source, day)
    return bool(part and (part.generation > 0 or part.ready_at) and part.status != "failed")


async def _fenced(rt: Runtime, source: str, day: dt.date, lease: Lease, exc: FencedOut) -> Outcome:
    """The lease was taken over before this load's commit: nothing of it was made visible or
    recorded on the partition, which is the other replica's now. Only the run says so."""
    reason = f"fenced out: {exc}"
    log.warning("load.fenced", source=source, day=day.isoformat(), run_id=lease.run_id, token=lease.token,
                replica=rt.replica)
    if lease.run_id is not None:
        await rt.state.finish_run(lease.run_id, status="failed", reason=reason)
    return Outcome("fenced", lease.run_id, reason=reason)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


async def _load(rt: Runtime, job: Job, day: dt.date, trigger: str, backfill_id: int | None,
                found: ProbeResult | None, lease: Lease) -> Outcome:
    """The rules of one load (README "How it works"): a day with rows loads once it is ready (the
    user's `ready` signal, else `ready_query`, else having rows); a day that lost its rows is
    replaced by an empty generation, and a large drop found by the daemon itself is held for the
    user to confirm when `hold_drop_pct` is set."""
    source, src = job.source, job.config
    started = time.monotonic()
    part = await rt.state.partition(source, day)
    served = part.generation if part else 0
    served_rows = (part.source_rows if part.source_rows is not None else part.rows or 0) if part and served else 0
    ready_marked = trigger == "ready" or bool(part and part.ready_at)
    marks = {"ready_at": part.ready_at if part and part.ready_at else _now()} if trigger == "ready" else {}
    try:
        if found is None:
            found = await probe(job, day)
        if found.rows == 0:
            ready = served > 0  # nothing to load: only a loaded day has something to mirror (an empty generation)
        elif ready_marked or not src.ready_query:
            ready = True
        else:
            ready = await ready_answer(job, day)
    except Exception as exc:  # every failure is recorded as a run, with its reason
        return await _fail_without_run(rt, source, day, trigger, backfill_id, exc, started, marks, lease)
    fence: dict[str, Any] = {"fence_token": lease.token} if lease.token is not None else {}
    if not ready:
        why = "no rows yet" if found.rows == 0 else "ready_query says the day is not ready"
        run_id = lease.run_id = await rt.state.start_run(source, day, trigger, served, backfill_id, lambda rid: [],
                                                         first_load=served == 0)
        fields: dict[str, Any] = {"checked_at": _now(), **marks}
        if served == 0:
            fields.update(status="empty", rows=0, source_rows=0, error=None)
        await rt.state.finish_run(run_id, status="empty", reason=why, rows_fetched=0, rows_written=0,
                                  rows_rejected=0, duration_ms=_ms(started), partition=fields, **fence,
                                  events=[event(LoadEmpty, source, day, run_id, trigger=trigger, reason=why,
                                                source_rows=found.rows)])
        return Outcome("empty", run_id, served or None, reason=why)
    if held := _hold(src.hold_drop_pct, trigger, served_rows, found.rows):
        await _record_hold(rt, source, day, part, found.rows, held)
        return Outcome("held", None, served, reason=f"held: {served_rows} -> {found.rows} rows (-{held:.1f}%)")
    visible = await job.sink.read_generation(src.kind, source, day)
    generation = max(served, visible.generation if visible else 0, lease.floor() - 1) + 1
    run_id = lease.run_id = await rt.state.start_run(
        source, day, trigger, generation, backfill_id,
        lambda rid: [event(LoadStarted, source, day, rid, trigger=trigger, generation=generation)],
        first_load=served == 0)
    failed: dict[str, Any] = {}  # the counts of the last attempt, when it fails

    async def check_schema(schema: pa.Schema) -> None:
        """Schema drift (engine/drift.py), seen on the first batch, before any row is mapped."""
        reason = await drift.observe(rt, job, day, schema, seen_by="load", confirmed=trigger not in AUTOMATIC,
                                     run_id=run_id)
        if reason:
            raise PermanentError(reason)

    try:
        stats = await with_retry(
            job.daemon, "load", lambda: _stream(job, day, generation, failed, _Progress(rt, run_id), check_schema,
                                              lease),
            source=source, day=day.isoformat(), run_id=run_id, generation=generation)
    except FencedOut:
        raise
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
            run_id, status="failed", reason=reason, duration_ms=_ms(started),
            partition={"status": "failed", "error": reason, "checked_at": _now(), **marks}, **fence,
            rows_fetched=stats.get("fetched"), rows_rejected=stats.get("rejected"), rejects=stats.get("reasons"),
            samples=stats.get("samples"),
            events=[event(LoadFailed, source, day, run_id, trigger=trigger, reason=reason, transient=transient,
                          generation=generation, serving=served or None)])
        if isinstance(exc, asyncio.CancelledError):
            raise
        return Outcome("failed", run_id, generation, reason=reason)
    duration = _ms(started)
    now = _now()
    status = "emptied" if stats["written"] == 0 and served_rows > 0 else "succeeded"
    extra = {"previous_rows": served_rows} if served else {}
    await rt.state.finish_run(
        run_id, status="succeeded", rows_fetched=stats["fetched"], rows_written=stats["written"],
        rows_rejected=stats["rejected"], rejects=stats["reasons"], samples=stats["samples"],
        fingerprint=found.fingerprint, duration_ms=duration, **fence,
        partition={"status": status, "generation": generation, "rows": stats["written"],
                   "source_rows": stats["fetched"], "fingerprint": found.fingerprint, "loaded_at": now,
                   "checked_at": now, "error": None, "held_rows": None, **marks},
        events=[event(LoadSucceeded, source, day, run_id, trigger=trigger, generation=generation,
                      rows=stats["written"], fetched=stats["fetched"], rejected=stats["rejected"],
                      duration_ms=duration, first_load=served == 0, **extra)])
    if stats.get("schema") is not None:
        await drift.remember(rt, job, day, run_id, stats["schema"])
    return Outcome(status, run_id, generation, stats["written"])


def _hold(hold_drop_pct: float | None, trigger: str, loaded: int, now: int) -> float | None:
    """The drop in percent when an automatic reload from `loaded` to `now` rows must be held."""
    if hold_drop_pct is None or trigger not in AUTOMATIC or loaded <= 0 or now >= loaded:
        return None
    drop = (loaded - now) * 100 / loaded
    return drop if drop > hold_drop_pct else None


async def _record_hold(rt: Runtime, source: str, day: dt.date, part: PartitionRow | None, rows: int,
                       drop: float) -> None:
    """Mark the day held (its generation stays served); `check.held` once per new count."""
    loaded = (part.source_rows if part and part.source_rows is not None else part.rows or 0) if part else 0
    news = [] if part and part.status == "held" and part.held_rows == rows else [event(
        CheckHeld, source, day, None, loaded_rows=loaded, rows=rows, drop_pct=round(drop, 3),
        confirm=f"ingestd load {source} --day {day.isoformat()}")]
    await rt.state.set_partition(source, day, events=news, status="held", held_rows=rows, checked_at=_now(),
                                 error=f"held: the warehouse has {rows} rows, {loaded} were loaded (-{drop:.1f}%); "
                                       f"confirm with `ingestd load {source} --day {day.isoformat()}`")


async def _fail_without_run(rt: Runtime, source: str, day: dt.date, trigger: str, backfill_id: int | None,
                            exc: Exception, started: float, marks: dict[str, Any], lease: Lease) -> Outcome:
    part = await rt.state.partition(source, day)
    reason = str(exc) if isinstance(exc, IngestdError) else f"{type(exc).__name__}: {exc}"
    if not isinstance(exc, IngestdError):
        log.error("probe.error", source=source, day=day.isoformat(), exc_info=exc)
    served = part.generation if part else 0
    run_id = lease.run_id = await rt.state.start_run(source, day, trigger, served, backfill_id, lambda rid: [],
                                                     first_load=served == 0)
    fence: dict[str, Any] = {"fence_token": lease.token} if lease.token is not None else {}
    await rt.state.finish_run(
        run_id, status="failed", reason=reason, duration_ms=_ms(started), **fence,
        partition={"status": "failed", "error": reason, "checked_at": _now(), **marks},
        events=[event(LoadFailed, source, day, run_id, trigger=trigger, reason=reason,
                      transient=isinstance(exc, TransientError), serving=served or None)])
    return Outcome("failed", run_id, reason=reason)


class _Progress:
    """Writes a running load's fetched rows to its run row now and then, for `status`."""

    EVERY_SECONDS = 2.0

    def __init__(self, rt: Runtime, run_id: str):
        self.rt, self.run_id = rt, run_id
        self.last = 0.0

    async def __call__(self, rows: int) -> None:
        if time.monotonic() - self.last >= self.EVERY_SECONDS:
            self.last = time.monotonic()
            await self.rt.state.progress(self.run_id, rows)


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


_DONE = object()


async def _stream(job: Job, day: dt.date, generation: int, failed: dict[str, Any],
                  progress: Callable[[int], Awaitable[None]] | None = None,
                  on_schema: Callable[[pa.Schema], Awaitable[None]] | None = None,
                  lease: Lease | None = None) -> dict[str, Any]:
    """One attempt: fetch, map and write overlapping; returns counts (and `schema`, the result
    schema of the first batch). Raises on any failure, after which the sink still holds the
    previous generation and `failed` the attempt's counts. `on_schema` sees the first batch's
    schema before the batch goes on, and may raise to stop the load before any row is written."""
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
                    if "schema" not in stats:
                        stats["schema"] = batch.schema
                        if on_schema is not None:
                            await on_schema(batch.schema)
                    stats["fetched"] += batch.num_rows
                    await fetched_q.put(batch)
                    if progress is not None:
                        await progress(stats["fetched"])
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
        target = Target(src.kind, source, day, generation, lease.fence if lease else None)
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
    its fingerprint changed, or load it if it had no rows and now has. Downloads no rows for an
    unchanged day. A held day whose count came back is released. Returns what it did."""
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
        await rt.state.set_partition(source, day, checked_at=_now(), **first_seen)
        return "empty"
    loaded = part.source_rows if part.source_rows is not None else (part.rows or 0)
    change_pct = abs(found.rows - loaded) * 100 / loaded if loaded else (100.0 if found.rows else 0.0)
    caps = job.connector.capabilities
    fp_changed = (src.recheck.detect == "checksum" and caps.fingerprint and found.fingerprint is not None
                  and found.fingerprint != part.fingerprint)
    if change_pct > src.recheck.threshold_pct or fp_changed:
        if not (part.status == "held" and part.held_rows == found.rows):
            await rt.state.set_partition(source, day, checked_at=_now(), events=[event(
                CheckChanged, source, day, None, loaded_rows=loaded, rows=found.rows,
                change_pct=round(change_pct, 3), fingerprint_changed=fp_changed)])
        out = await load_partition(rt, job, day, "recheck", found=found)
        return {"succeeded": "reloaded"}.get(out.status, out.status)
    released = {"status": "emptied" if loaded == 0 else "succeeded", "held_rows": None, "error": None} \
        if part.status == "held" else {}
    await rt.state.set_partition(source, day, checked_at=_now(), **released, events=[event(
        CheckUnchanged, source, day, None, rows=found.rows, change_pct=round(change_pct, 3))])
    return "unchanged"


async def recover(rt: Runtime) -> list[str]:
    """Settle runs left `running` by a killed process, from what the sink really holds. With
    replicas, a run is settled under its day's lease: one whose replica still holds the lease is
    running, not interrupted, and is left alone."""
    settled = []
    for run in await rt.state.running_runs():
        lock = rt.partition_lock(run.source, run.day)
        if lock.locked():
            continue  # this process is loading that day now
        async with lock, partition_lease(rt, run.source, run.day) as lease:
            if lease is not None and await _settle_run(rt, run):
                settled.append(run.run_id)
    return settled


async def _settle_run(rt: Runtime, run: RunRow) -> bool:
    """Settle one interrupted run, from what the sink holds; False if it ended meanwhile."""
    if (current := await rt.state.run(run.run_id)) is None or current.status != "running":
        return False
    if run.source not in rt.config.sources:
        await rt.state.finish_run(run.run_id, status="failed", reason="interrupted; source no longer configured")
        return True
    kind = rt.config.sources[run.source].kind
    info = await rt.sink_of(run.source).read_generation(kind, run.source, run.day)
    part = await rt.state.partition(run.source, run.day)
    if part is not None and run.generation and part.generation >= run.generation:
        # A later load (another replica's, after this run's lease lapsed) published since: the
        # partition is that load's; only the run is closed.
        await rt.state.finish_run(run.run_id, status="failed", reason="interrupted: the process stopped during the "
                                  f"load; generation {part.generation} was published by a later load since")
        return True
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
    return True
