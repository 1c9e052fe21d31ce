"""`/metrics`: Prometheus text (or OpenMetrics, when the scraper asks) from prometheus-client.

Counters and the load duration histogram follow the events this process commits (so they count
from the daemon's start, as Prometheus counters do); gauges are read from the state store and the
services at each scrape. Names and labels are stable; README.md lists them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from ..core.events import Event
from ..engine.runtime import Runtime
from ..plugin import API_VERSION
from ..service.control import Control

DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, float("inf"))


def ingestd_version() -> str:
    try:
        return version("ingestd")
    except PackageNotFoundError:
        return "unknown"


class Metrics:
    def __init__(self, rt: Runtime, control: Control):
        self.rt = rt
        self.control = control
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no `_created` series beside each counter: noise for dashboards
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.loads = Counter("ingestd_loads", "Loads finished, by source, trigger and outcome "
                             "(succeeded, emptied, empty: not ready, failed)", ["source", "trigger", "outcome"],
                             registry=r)
        self.rows_written = Counter("ingestd_rows_written", "Rows written to the sink by successful loads",
                                    ["source"], registry=r)
        self.rows_rejected = Counter("ingestd_rows_rejected", "Rows rejected by the mapping in successful loads",
                                     ["source"], registry=r)
        self.duration = Histogram("ingestd_load_duration_seconds", "Duration of successful loads", ["source"],
                                  buckets=DURATION_BUCKETS, registry=r)
        self.rechecks = Counter("ingestd_rechecks", "Re-checks of loaded days, by result (changed, unchanged, held)",
                                ["source", "result"], registry=r)
        self.snapshot: dict[str, Any] = {}
        self.ready = False
        r.register(_Scraped(self))
        for name in rt.config.sources:
            for outcome in ("succeeded", "failed"):
                self.loads.labels(name, "scheduled", outcome)
            self.rows_written.labels(name)
            self.rows_rejected.labels(name)
            self.rechecks.labels(name, "changed")
        rt.dispatch.listeners.append(self.on_event)

    def on_event(self, event: Event) -> None:
        source, data = event.source or "", event.data
        trigger = str(data.get("trigger", "unknown"))
        if event.type == "load.succeeded":
            emptied = data.get("rows") == 0 and bool(data.get("previous_rows"))
            self.loads.labels(source, trigger, "emptied" if emptied else "succeeded").inc()
            self.rows_written.labels(source).inc(int(data.get("rows") or 0))
            self.rows_rejected.labels(source).inc(int(data.get("rejected") or 0))
            if data.get("duration_ms") is not None:
                self.duration.labels(source).observe(float(data["duration_ms"]) / 1000)
        elif event.type == "load.failed":
            self.loads.labels(source, trigger, "failed").inc()
        elif event.type == "load.empty":
            self.loads.labels(source, trigger, "empty").inc()
        elif event.type in ("check.changed", "check.unchanged", "check.held"):
            self.rechecks.labels(source, event.type.split(".", 1)[1]).inc()

    async def render(self, accept: str | None) -> tuple[bytes, str]:
        """Read the state (async), then let prometheus-client write the exposition."""
        self.snapshot = await self.control.metrics()
        self.ready = (await self.control.readiness())["ready"]
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class _Scraped(Collector):
    """The gauges read at scrape time, from `Metrics.snapshot`."""

    def __init__(self, metrics: Metrics):
        self.m = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        m, snap = self.m, self.m.snapshot
        info = InfoMetricFamily("ingestd_build", "ingestd's version and plugin API version")
        info.add_metric([], {"version": ingestd_version(), "api": str(API_VERSION)})
        yield info
        yield GaugeMetricFamily("ingestd_ready", "1 when /readyz says ready", value=1 if m.ready else 0)
        if not snap:
            return
        last = GaugeMetricFamily("ingestd_last_success_timestamp_seconds",
                                 "When the newest successful load of the source finished (Unix time)",
                                 labels=["source"])
        behind = GaugeMetricFamily("ingestd_days_behind", "Days between the newest day due (today minus lag_days, "
                                   "in the source's zone) and the newest loaded day", labels=["source"])
        newest = GaugeMetricFamily("ingestd_newest_loaded_day_timestamp_seconds",
                                   "The newest loaded day of the source (its date at 00:00 UTC, Unix time)",
                                   labels=["source"])
        for name, s in snap["sources"].items():
            if name in snap["last_success"]:
                last.add_metric([name], dt.datetime.fromisoformat(snap["last_success"][name]).timestamp())
            if s["behind"] is not None:
                behind.add_metric([name], s["behind"])
                day = s["newest"]
                newest.add_metric([name], dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp())
        yield last
        yield behind
        yield newest
        days = GaugeMetricFamily("ingestd_days", "Days in the state store by source and status (succeeded, emptied, "
                                 "empty, held, failed, ...)", labels=["source", "status"])
        for (source, status), n in sorted(snap["days"].items()):
            if source in snap["sources"]:
                days.add_metric([source, status], n)
        yield days
        running = GaugeMetricFamily("ingestd_running_loads", "Loads running now, by source", labels=["source"])
        counts: dict[str, int] = dict.fromkeys(snap["sources"], 0)
        for source, _trigger in snap["running"]:
            counts[source] = counts.get(source, 0) + 1
        for source, n in sorted(counts.items()):
            running.add_metric([source], n)
        yield running
        total = GaugeMetricFamily("ingestd_backfill_days", "Source-days of each running backfill",
                                  labels=["backfill"])
        done = GaugeMetricFamily("ingestd_backfill_days_done", "Source-days of each running backfill that finished",
                                 labels=["backfill"])
        failed = GaugeMetricFamily("ingestd_backfill_days_failed", "Source-days of each running backfill that failed",
                                   labels=["backfill"])
        for b in snap["backfills"]:
            total.add_metric([str(b["id"])], b["total"])
            done.add_metric([str(b["id"])], b["done"])
            failed.add_metric([str(b["id"])], b.get("failed", 0))
        yield total
        yield done
        yield failed
        yield GaugeMetricFamily("ingestd_backfills_running", "Backfills running now", value=len(snap["backfills"]))
        yield GaugeMetricFamily("ingestd_outbox_depth", "Events waiting in the outbox for the MQTT broker",
                                value=snap["outbox"])
        bus_check = m.control.checks.get("bus")
        yield GaugeMetricFamily("ingestd_bus_enabled", "1 when [bus] is enabled", value=1 if bus_check else 0)
        yield GaugeMetricFamily("ingestd_bus_connected", "1 while connected to the MQTT broker",
                                value=1 if bus_check and bus_check()[0] else 0)
        observed = CounterMetricFamily("ingestd_observer_deliveries", "Events handled by each observer "
                                       "([observers.NAME]), by outcome (delivered, retried, failed, dropped)",
                                       labels=["observer", "type", "outcome"])
        for name, observer in sorted(m.rt.observers.items()):
            for outcome, n in observer.stats.counts.items():
                observed.add_metric([name, observer.type_name, outcome], n)
        yield observed
        hooks = CounterMetricFamily("ingestd_event_hook_failures", "Exceptions raised by plugins' ingestd_event hooks",
                                    labels=["plugin"])
        for plugin, n in sorted(m.rt.dispatch.hook_failures.items()):
            hooks.add_metric([plugin], n)
        yield hooks
