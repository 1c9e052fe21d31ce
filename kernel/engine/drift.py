"""Schema drift: each successful load stores the columns of the source query's result (names and
types, `ingestd.core.columns`); a later load, and the schema probe of each re-check window,
compare what they see with them.

A difference is recorded in the state store and sent as `schema.changed` once per new schema.
An added column only informs. A mapped column that was removed fails the load before any row is
written (no load could map it). A mapped column whose kind of type changed fails the loads the
daemon starts on its own (load and re-check windows) the same way, so rows are not read in a new
way unseen; a load the user starts (`ingestd load`, a `reload` or `ready` request, a backfill)
is the user's confirmation and takes the new schema, as does a query edited in daemon.toml since
the schema was stored.
"""

from __future__ import annotations

import datetime as dt
import hashlib

import pyarrow as pa

from ..core import logs
from ..core.columns import Column, column_list, columns_of, compare, roles
from ..core.errors import IngestdError
from ..core.events import SchemaChanged
from .job import Job
from .preview import learn_schema
from .runtime import Runtime, event

log = logs.get("ingestd.drift")


def query_hash(sql: str) -> str:
    return hashlib.sha256(sql.strip().encode()).hexdigest()[:16]


async def observe(rt: Runtime, job: Job, day: dt.date, schema: pa.Schema, *, seen_by: str, confirmed: bool,
                  run_id: str | None = None) -> str | None:
    """Compare `schema`, seen by a load (or probe) of `day`, with the stored one; record a
    difference and send `schema.changed` the first time this schema is seen. Returns why the load
    must fail (a mapped column removed; or retyped, unless `confirmed` by the user or the query
    was edited since), else None."""
    source = job.source
    stored = await rt.state.result_schema(source)
    if stored is None:
        return None
    now = columns_of(schema)
    change = compare([Column.from_dict(c) for c in stored.columns], now)
    if not change:
        if stored.seen is not None:
            await rt.state.note_schema_seen(source, None)
        return None
    feeds = roles(job.config.mapping)
    edited = stored.query_hash != query_hash(job.config.query)
    removed = [(key, c) for c in change.removed for key in feeds.get(c.name, [])]
    retyped = [(key, old, new) for old, new in change.retyped for key in feeds.get(new.name, [])]
    since = f"since the load of {stored.day}"
    fix = None
    if removed:
        fix = "loads fail until the mapping names another column or the query is fixed"
    elif retyped and not edited:
        fix = (f"automatic loads fail until you look (`ingestd preview {source} --day {day}`) and confirm with "
               f"`ingestd load {source} --day {day}` (a load you start takes the new schema)")
    reason = None
    if removed:
        said = "; ".join(f"column {c.name!r} (mapping.{key})" for key, c in removed)
        reason = (f"schema changed: {said} was removed from the query's result {since} (columns now: "
                  f"{column_list([c.name for c in now])}); map another column or fix the query")
    elif retyped and not edited and not confirmed:
        said = "; ".join(f"column {new.name!r} (mapping.{key}) from {old.type} to {new.type}"
                         for key, old, new in retyped)
        reason = (f"schema changed: {said} was retyped {since}; automatic loads stop so that rows are not read a "
                  f"new way unseen: look with `ingestd preview {source} --day {day}`, then confirm with "
                  f"`ingestd load {source} --day {day}` (a load you start takes the new schema)")
    blocking = bool(removed) or (bool(retyped) and not edited)
    seen = [c.as_dict() for c in now]
    if stored.seen is not None and not compare([Column.from_dict(c) for c in stored.seen], now):
        return reason  # this schema was reported already
    data = {**change.as_dict(), "mapped": sorted({f"mapping.{k}" for k, _ in removed} |
                                                 {f"mapping.{k}" for k, _, _ in retyped}),
            "blocking": blocking, "fix": fix, "seen_by": seen_by, "since_day": stored.day.isoformat(),
            "query_edited": edited}
    await rt.state.note_schema_seen(source, seen, {**data, "day": day.isoformat(), "summary": change.summary()},
                                    events=[event(SchemaChanged, source, day, run_id, **data)])
    return reason


async def remember(rt: Runtime, job: Job, day: dt.date, run_id: str, schema: pa.Schema) -> None:
    """Store the result schema of a successful load of `day`."""
    await rt.state.save_result_schema(job.source, [c.as_dict() for c in columns_of(schema)],
                                      query_hash(job.config.query), day, run_id)


async def probe_schema(rt: Runtime, job: Job, day: dt.date) -> None:
    """A re-check window's schema probe: the result schema of `day`'s query (without rows where
    the connector can tell it, else from one row), compared with the stored one. Only for a
    source a load stored a schema for; a failure is logged, never raised."""
    if await rt.state.result_schema(job.source) is None:
        return
    try:
        schema, _ = await learn_schema(job.connector, job.day_query(day), job.info)
    except IngestdError as exc:
        log.warning("schema.probe_failed", source=job.source, day=day.isoformat(), error=str(exc))
        return
    if schema is not None:
        await observe(rt, job, day, schema, seen_by="probe", confirmed=False)
