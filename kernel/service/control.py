"""The control layer: the one typed API behind every door. MQTT requests (`bus`), the CLI, and
next HTTP call these methods; none of them reaches into the engine or the daemon on its own.

Each method validates what it is given and raises `ControlError` (a sentence saying what is wrong)
before it changes anything. Work that outlives a request (a load, a backfill) runs as a named
task of the daemon's `Tasks`; the CLI, which runs in the foreground, awaits it instead.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal, overload
from zoneinfo import ZoneInfo

from ..core.errors import IngestdError
from ..engine import backfill as backfills
from ..engine.ingest import Outcome, load_day
from ..engine.planner import run_due
from ..engine.preview import bounded, preview_day
from ..engine.runtime import Runtime, SourceGone
from ..engine.state import Backfill
from .tasks import Tasks
from .views import calendar_report, local_today, status_report

HealthCheck = Callable[[], tuple[bool, str]]
"""A service's readiness: (ready, a few words saying why or why not)."""

TRIGGERS = {"ready": "ready", "load": "manual"}

PREVIEW_ROWS = 10
"""Rows a preview shows unless asked for another number."""
MAX_PREVIEW_ROWS = 100
"""The most rows a preview through the control layer (the `preview` request) reads."""
PREVIEW_ANSWER_BYTES = 65536
"""The most a preview answer holds, as JSON: longer texts are cut and rows dropped (`truncated`)."""
PREVIEW_SECONDS = 120.0
"""How long a preview may take before it is given up (it runs while other requests wait)."""


class ControlError(IngestdError):
    """What was wrong with a command, in a sentence; nothing was changed."""


@dataclass(frozen=True)
class BackfillTicket:
    backfill_id: int
    created: bool
    status: str
    sources: list[str]
    first: dt.date
    last: dt.date
    source_days: int
    skipped: int = 0

    def as_dict(self) -> dict[str, Any]:
        """`days` counts calendar days of the range; `source_days` the (source, day) loads it
        holds; `skipped` the source-days `missing` left out as loaded already."""
        return {"backfill_id": self.backfill_id, "created": self.created, "status": self.status,
                "sources": self.sources, "from": self.first.isoformat(), "to": self.last.isoformat(),
                "days": (self.last - self.first).days + 1, "source_days": self.source_days,
                "skipped": self.skipped}


@dataclass(frozen=True)
class LoadTicket:
    source: str
    day: dt.date
    trigger: str
    accepted: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "day": self.day.isoformat()}


class Control:
    def __init__(self, rt: Runtime, tasks: Tasks, *, activity: Callable[[], str] | None = None):
        self.rt = rt
        self.tasks = tasks
        self._activity = activity or (lambda: ", ".join(sorted(rt.activity.values())) or "idle")
        self.checks: dict[str, HealthCheck] = {}
        """Readiness of the services beside the control layer (the bus), by name; `readiness` asks them."""

    def source(self, name: str) -> str:
        if name not in self.rt.config.sources:
            configured = ", ".join(sorted(self.rt.config.sources)) or "none"
            raise ControlError(f"unknown source {name!r} (configured: {configured})")
        return name

    # -- status ------------------------------------------------------------------------------------

    async def status(self, source: str | None = None, days: int = 7) -> dict[str, Any]:
        names = [self.source(source)] if source else sorted(self.rt.config.sources)
        report = await status_report(self.rt.config, self.rt.state, names, days, dt.datetime.now(dt.UTC))
        return {**report, "activity": self._activity()}

    async def calendar(self, days: int = 35, source: str | None = None) -> dict[str, Any]:
        """The status page's data (`views.calendar_report`): each source's last `days` days with
        their states and runs, running loads and backfills, next windows."""
        names = [self.source(source)] if source else sorted(self.rt.config.sources)
        report = await calendar_report(self.rt.config, self.rt.state, names, days, dt.datetime.now(dt.UTC))
        return {**report, "activity": self._activity(), "instance": self.rt.config.instance()}

    # -- health ----------------------------------------------------------------------------------------

    async def readiness(self) -> dict[str, Any]:
        """Whether this process can do its work: config read, state store answering, every sink
        open, and each service's own check (the bus connected, when enabled)."""
        checks: dict[str, dict[str, Any]] = {"config": {"ok": True, "detail": str(self.rt.config.file)}}
        try:
            await self.rt.state.ping()
            checks["state"] = {"ok": True, "detail": "open"}
        except Exception as exc:
            checks["state"] = {"ok": False, "detail": str(exc)}
        for name in self.rt.config.sinks:
            error = self.rt.sink_error(name)
            checks[f"sink:{name}"] = {"ok": error is None, "detail": error or "open"}
        for name, check in self.checks.items():
            try:
                ok, detail = check()
            except Exception as exc:
                ok, detail = False, repr(exc)
            checks[name] = {"ok": ok, "detail": detail}
        return {"ready": all(c["ok"] for c in checks.values()), "checks": checks}

    async def metrics(self) -> dict[str, Any]:
        """What `/metrics` reads from the state store at each scrape: days per source and status,
        each source's newest loaded day and the day it should have, its last successful load,
        running loads and backfills, the outbox depth."""
        now = dt.datetime.now(dt.UTC)
        state, config = self.rt.state, self.rt.config
        sources = {}
        for name, src in config.sources.items():
            newest = await state.last_loaded_day(name)
            expected = local_today(now, src.timezone) - dt.timedelta(days=src.lag_days)
            sources[name] = {"newest": newest, "expected": expected,
                             "behind": (expected - newest).days if newest else None}
        backfills = [{"id": b.id, **(await state.backfill_progress(b.id))} for b in await state.backfills("running")]
        return {"sources": sources, "days": await state.partition_counts(),
                "last_success": await state.last_loaded_at(),
                "running": [(r.source, r.trigger) for r in await state.running_runs()], "backfills": backfills,
                "outbox": await state.outbox_depth() if state.outbox_enabled else 0}

    def waiting_for(self) -> list[str]:
        """What this process is busy with (loads, backfills), in words, for a second Ctrl-C."""
        return sorted(self.rt.activity.values())

    def _require_sinks(self, source: str) -> None:
        error = self.rt.sink_error(self.rt.config.sink_of(source))
        if error is not None:
            raise ControlError(f"source {source!r} cannot load now: its sink {self.rt.config.sink_of(source)!r} is not "
                               f"open ({error}); the daemon keeps trying to open it")

    # -- preview -------------------------------------------------------------------------------------

    async def preview(self, source: str, day: dt.date | None = None, rows: int = PREVIEW_ROWS) -> dict[str, Any]:
        """The source's query for `day` (default: the newest day with rows in its look-back) read
        to `rows` rows, limited in the warehouse where the connector can, and mapped as a load
        would; see `ingestd.engine.preview.preview`. Writes nothing: no run, partition, metering,
        event or sink row. The answer is at most PREVIEW_ANSWER_BYTES of JSON."""
        self.source(source)
        if isinstance(rows, bool) or not 1 <= rows <= MAX_PREVIEW_ROWS:
            raise ControlError(f"rows must be between 1 and {MAX_PREVIEW_ROWS}, got {rows!r}")
        try:
            async with asyncio.timeout(PREVIEW_SECONDS), self.rt.job(source) as job:
                report = await preview_day(job.reader, day, rows, config_file=str(self.rt.config.file))
        except TimeoutError:
            raise ControlError(f"the preview of {source!r} took longer than {PREVIEW_SECONDS:.0f} s and was given "
                               "up; name a --day, or ask for fewer rows") from None
        except SourceGone as exc:
            raise ControlError(str(exc)) from None
        except IngestdError as exc:
            raise ControlError(f"the preview of {source!r} failed: {exc}") from None
        return bounded(report, PREVIEW_ANSWER_BYTES)

    # -- loads ---------------------------------------------------------------------------------------

    @overload
    async def load(self, source: str, day: dt.date, *, command: str = ...,
                   wait: Literal[False] = ...) -> LoadTicket: ...
    @overload
    async def load(self, source: str, day: dt.date, *, command: str = ..., wait: Literal[True]) -> Outcome: ...
    @overload
    async def load(self, source: str, day: dt.date, *, command: str = ..., wait: bool) -> LoadTicket | Outcome: ...

    async def load(self, source: str, day: dt.date, *, command: str = "load",
                   wait: bool = False) -> LoadTicket | Outcome:
        """Load (or reload) one day now. `command` "ready" records the user's word that the day is
        complete: it loads even when the source's ready_query says no, and load windows leave the
        day alone from then on (re-checks still reload it when it changes). A day in the future,
        or older than `max_backfill_days`, is refused. With `wait`, returns the outcome; else the
        load runs as a task and the ticket says it was accepted."""
        self.source(source)
        self._require_sinks(source)
        trigger = TRIGGERS[command]
        if command == "ready":
            self._check_ready_day(source, day)
        if wait:
            try:
                return await load_day(self.rt, source, day, trigger)
            except SourceGone as exc:
                raise ControlError(str(exc)) from None
        self.tasks.spawn(self._load_quietly(source, day, trigger), f"{command}-{source}-{day}")
        return LoadTicket(source, day, trigger)

    def _check_ready_day(self, source: str, day: dt.date) -> None:
        src = self.rt.config.sources[source]
        today = dt.datetime.now(ZoneInfo(src.timezone)).date()
        oldest = today - dt.timedelta(days=self.rt.config.daemon.max_backfill_days)
        if day > today:
            raise ControlError(f"day {day} is in the future for source {source!r} (today is {today} in "
                               f"{src.timezone}): a day can be ready only once it has begun")
        if day < oldest:
            raise ControlError(f"day {day} is older than max_backfill_days ({self.rt.config.daemon.max_backfill_days}"
                               f" days before {today}); use a backfill or raise the limit")

    async def _load_quietly(self, source: str, day: dt.date, trigger: str) -> None:
        try:
            await load_day(self.rt, source, day, trigger)
        except SourceGone:
            pass  # removed by a reload before the load started: nothing to do

    # -- backfills -----------------------------------------------------------------------------------

    def resolve_sources(self, source: str | list[str]) -> list[str]:
        try:
            return backfills.resolve_sources(self.rt, source)
        except backfills.BackfillRejected as exc:
            raise ControlError(str(exc)) from None

    async def submit_backfill(self, source: str | list[str], first: dt.date, last: dt.date, *,
                              request_id: str | None = None, origin: str = "cli",
                              missing: bool = False) -> tuple[Backfill, bool]:
        """Store a backfill durably (or find the one stored under `request_id`); runs nothing."""
        for name in self.resolve_sources(source):
            self._require_sinks(name)
        try:
            b, created = await backfills.submit(self.rt, source, first, last, request_id=request_id, origin=origin,
                                                missing=missing)
        except backfills.BackfillRejected as exc:
            raise ControlError(str(exc)) from None
        if not created:
            asked = (self.resolve_sources(source), first, last, missing)
            if (b.sources, b.day_from, b.day_to, b.missing) != asked:
                raise ControlError(
                    f"conflict: request_id {request_id!r} was used for backfill {b.id} ({', '.join(b.sources)} from "
                    f"{b.day_from} to {b.day_to}{', missing only' if b.missing else ''}), not this request; "
                    "nothing was changed: send a new request_id for a different backfill")
        return b, created

    async def find_backfill(self, sources: list[str], first: dt.date, last: dt.date) -> Backfill | None:
        return await self.rt.state.find_backfill(sources, first, last)

    async def backfill(self, source: str | list[str], first: dt.date, last: dt.date, *,
                       request_id: str | None = None, origin: str = "mqtt", missing: bool = False) -> BackfillTicket:
        """Store a backfill and start it in the background (a stored one that is not running yet,
        e.g. after a restart, is started too)."""
        b, created = await self.submit_backfill(source, first, last, request_id=request_id, origin=origin,
                                                missing=missing)
        if b.status == "running":
            self.start_backfill(b.id)
        days = len(await self.rt.state.backfill_days(b.id))
        return BackfillTicket(b.id, created, b.status, b.sources, b.day_from, b.day_to, days, b.skipped)

    def start_backfill(self, backfill_id: int) -> None:
        name = f"backfill-{backfill_id}"
        if not self.tasks.running(name):
            self.tasks.spawn(backfills.run(self.rt, backfill_id), name)

    async def resume_backfills(self) -> None:
        """Start every stored backfill left running (by a stop or a kill)."""
        for b in await self.rt.state.backfills("running"):
            self.start_backfill(b.id)

    async def run_backfill(self, backfill_id: int,
                           on_progress: Callable[[int, int, str, dt.date, str], None] | None = None) -> str:
        """Run a stored backfill in the foreground (the CLI); returns its final status."""
        return await backfills.run(self.rt, backfill_id, on_progress)

    async def cancel(self, backfill_id: int) -> dict[str, Any]:
        if not await backfills.cancel(self.rt, backfill_id):
            raise ControlError(f"no running backfill with id {backfill_id}")
        return {"backfill_id": backfill_id, "status": "cancelled"}

    # -- what is due -----------------------------------------------------------------------------------

    async def catch_up(self, now: dt.datetime) -> dict[str, dict[str, dict[dt.date, str]]]:
        """`ingestd run --once`: finish stored backfills, then everything due at `now` for each
        enabled source (catch-up, the load window, a re-check that fell due), in the foreground."""
        for b in await self.rt.state.backfills("running"):
            await backfills.run(self.rt, b.id)
        return {name: await run_due(self.rt, name, now)
                for name, src in self.rt.config.sources.items() if src.enabled}
