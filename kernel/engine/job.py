"""A load's snapshot of its source: the source's config, its connector and its sink, taken when
the load starts.

A SIGHUP swaps the runtime's config while loads run. Every step of a load (probe, ready query,
fetch, the sink's generation, the write) reads the job it started with, never the runtime's
current config, so a reload changes only loads that start after it: a source renamed, moved to
another sink or connection, or removed mid-load finishes (or fails) whole on what it started with.
The job pins its connector and sink: a reload retires them, and they are closed when the last job
using them ends.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from ..core.config import DaemonSection, SourceSection
from ..core.contracts import Connector, Sink, SourceInfo
from ..core.query import DayQuery, DayWindow, day_queries, day_query


@dataclass(frozen=True)
class SourceQuery:
    """A source's query on its connector, without a sink or state: what a preview and
    `ingestd check` read through, and the query side of every `Job`."""

    source: str
    config: SourceSection
    connector: Connector

    @property
    def info(self) -> SourceInfo:
        return SourceInfo(self.source, self.config.timezone)

    def window(self, day: dt.date) -> DayWindow:
        return DayWindow.of(day, self.config.timezone)

    def day_query(self, day: dt.date, sql: str | None = None) -> DayQuery:
        """The source's query (or `sql`, e.g. its ready_query) bound to `day` for this connector."""
        return day_query(sql or self.config.query, self.window(day), self.connector.capabilities,
                         **self.config.mapping.day_filter(self.config.kind))


@dataclass(frozen=True)
class Job:
    source: str
    config: SourceSection
    connection: str
    connection_type: str
    connection_config: Any
    connector: Connector
    sink_name: str
    sink: Sink
    daemon: DaemonSection
    secrets: tuple[str, ...] = ()

    @property
    def reader(self) -> SourceQuery:
        return SourceQuery(self.source, self.config, self.connector)

    @property
    def info(self) -> SourceInfo:
        return self.reader.info

    @property
    def batch_rows(self) -> int:
        return self.config.batch_rows or self.daemon.batch_rows

    def window(self, day: dt.date) -> DayWindow:
        return self.reader.window(day)

    def day_query(self, day: dt.date, sql: str | None = None) -> DayQuery:
        """The source's query (or `sql`, e.g. its ready_query) bound to `day` for this connector."""
        return self.reader.day_query(day, sql)

    def slice_queries(self, day: dt.date) -> list[DayQuery]:
        """The day query cut into the source's `slices` disjoint parts (see `day_queries`)."""
        return day_queries(self.config.query, self.window(day), self.connector.capabilities,
                           slices=self.config.slices, slice_column=self.config.slice_column,
                           **self.config.mapping.day_filter(self.config.kind))
