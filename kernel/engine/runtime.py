"""What one ingestd process holds while it works: config, plugins, state store, connector and
sink instances, the event dispatcher, and the limits on concurrent work."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from ..core import logs
from ..core.config import Config
from ..core.contracts import Connector, SourceInfo, Sink
from ..core.errors import ConfigError, ConfigErrors
from ..core.events import Event
from ..plugin.manager import LoadedPlugins
from ..core.query import DayQuery, DayWindow, render
from .state import StateStore

log = logs.get("ingestd")


class Dispatcher:
    """Hands committed events to the log and to every `ingestd_event` hook, one observer's
    failure isolated from the others."""

    def __init__(self, plugins: LoadedPlugins):
        self.plugins = plugins
        self.listeners: list[Callable[[Event], None]] = []

    def __call__(self, events: list[Event]) -> None:
        for event in events:
            fields = {"source": event.source, "day": event.day.isoformat() if event.day else None,
                      "run_id": event.run_id, **event.data}
            log.info(event.type, **{k: v for k, v in fields.items() if v is not None})
            for impl in self.plugins.manager.hook.ingestd_event.get_hookimpls():
                try:
                    impl.function(event=event)
                except Exception as exc:
                    log.warning("plugin.event_hook_failed", plugin=impl.plugin_name, error=repr(exc))
            for listener in list(self.listeners):
                try:
                    listener(event)
                except Exception as exc:
                    log.warning("listener_failed", error=repr(exc))


class Runtime:
    def __init__(self, config: Config, plugins: LoadedPlugins, *, now: Callable[[], dt.datetime] | None = None,
                 outbox: bool | None = None):
        self.config = config
        self.plugins = plugins
        self.dispatch = Dispatcher(plugins)
        self.now = now or (lambda: dt.datetime.now(dt.UTC))
        self.state = StateStore(config.state_path(), outbox=config.bus.enabled if outbox is None else outbox,
                                on_events=self.dispatch)
        self.connectors: dict[str, Connector] = {}
        self.sinks: dict[str, Sink] = {}
        self.retired_sinks: list[Sink] = []
        """Sinks a reload replaced or removed: loads that started before may still use them, so
        they are closed with the runtime."""
        self.slots = asyncio.Semaphore(config.daemon.max_concurrent_loads)
        self._partition_locks: dict[tuple[str, dt.date], asyncio.Lock] = defaultdict(asyncio.Lock)
        self.activity: dict[str, str] = {}
        self.stopping = asyncio.Event()

    async def open(self) -> "Runtime":
        check_capabilities(self.config, self.plugins)
        logs.set_secrets(self.config.secrets())
        await self.state.open()
        try:
            for name, plugged in self.config.sinks.items():
                sink = self.plugins.registry.sinks[plugged.type](plugged.config, name=name)
                await sink.open()
                self.sinks[name] = sink
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        for c in self.connectors.values():
            with contextlib.suppress(Exception):
                await c.close()
        for s in [*self.sinks.values(), *self.retired_sinks]:
            with contextlib.suppress(Exception):
                await s.close()
        self.connectors.clear()
        self.sinks.clear()
        self.retired_sinks.clear()
        await self.state.close()

    def retire_sink(self, name: str) -> None:
        sink = self.sinks.pop(name, None)
        if sink is not None:
            self.retired_sinks.append(sink)

    def connector(self, name: str) -> Connector:
        if name not in self.connectors:
            plugged = self.config.connections[name]
            self.connectors[name] = self.plugins.registry.connectors[plugged.type](plugged.config, name=name)
        return self.connectors[name]

    def connector_of(self, source: str) -> Connector:
        return self.connector(self.config.sources[source].connection)

    def sink_of(self, source: str) -> Sink:
        return self.sinks[self.config.sink_of(source)]

    def source_info(self, source: str) -> SourceInfo:
        return SourceInfo(source, self.config.sources[source].timezone)

    def day_query(self, source: str, day: dt.date, sql: str | None = None) -> DayQuery:
        src = self.config.sources[source]
        caps = self.connector_of(source).capabilities
        column, kind = src.mapping.filter_column(src.kind)
        return render(sql or src.query, DayWindow.of(day, src.timezone), caps.paramstyle,
                      filter_column=column, filter_kind=kind, quote=caps.quote)

    def partition_lock(self, source: str, day: dt.date) -> asyncio.Lock:
        return self._partition_locks[(source, day)]

    def batch_rows(self, source: str) -> int:
        return self.config.sources[source].batch_rows or self.config.daemon.batch_rows


def check_capabilities(config: Config, plugins: LoadedPlugins) -> None:
    """Config errors that need the plugins' declared capabilities."""
    errors = []
    for name, src in config.sources.items():
        conn = config.connections[src.connection]
        cls = plugins.registry.connectors[conn.type]
        if src.recheck.detect == "checksum" and not cls.capabilities_for(conn.config).fingerprint:
            why = (f"connector type {conn.type!r} gives no content fingerprint" if not cls.capabilities.fingerprint
                   else f"connection {src.connection!r} is configured without content fingerprints")
            errors.append(ConfigError(f"sources.{name}.recheck.detect", f"{why}; use detect = \"count\"",
                                      file=str(config.file)))
    if errors:
        raise ConfigErrors(errors)


def event(cls: type[Event], source: str | None, day: dt.date | None, run_id: str | None = None, **data: Any) -> Event:
    return cls(source=source, day=day, run_id=run_id, data=data)
