"""What one ingestd process holds while it works: config, plugins, state store, connector and
sink instances, the event dispatcher, and the limits on concurrent work.

Loads never read the runtime's config directly: they take a `Job` (a snapshot of their source,
connector and sink) when they start, so a SIGHUP that swaps the config (`reconfigure`) changes
only loads that start after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import os
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, TypeVar

from ..core import logs
from ..core.config import Config
from ..core.contracts import Connector, Observer, Sink
from ..core.errors import ConfigError, ConfigErrors, IngestdError
from ..core.events import Event
from ..core.secrets import SECRETS, scrub_value
from ..plugin.manager import LoadedPlugins
from .job import Job
from .state import store_for

log = logs.get("ingestd")


class SourceGone(IngestdError):
    """The source was removed from the config (a reload) before its work could start."""


LOG_LEVELS = {"load.failed": "error", "check.held": "warning", "schema.changed": "warning"}
"""Events logged above `info`: a failure, or a change that waits for the user."""


class SinkUnavailable(IngestdError):
    """A source's sink is not open (the daemon keeps trying to open it)."""


class Dispatcher:
    """Hands committed events to the log, to every `ingestd_event` hook, to the configured
    observers (`[observers.NAME]`) and to the process's listeners (the bus, the metrics), one
    observer's failure isolated from the others."""

    def __init__(self, plugins: LoadedPlugins):
        self.plugins = plugins
        self.listeners: list[Callable[[Event], None]] = []
        self.observers: list[Observer] = []
        self.hook_failures: dict[str, int] = {}

    def __call__(self, events: list[Event]) -> None:
        for event in (_scrubbed(e) for e in events):
            fields = {"source": event.source, "day": event.day.isoformat() if event.day else None,
                      "run_id": event.run_id, **event.data}
            getattr(log, LOG_LEVELS.get(event.type, "info"))(
                event.type, **{k: v for k, v in fields.items() if v is not None})
            for observer in list(self.observers):
                try:
                    observer.observe(event)
                except Exception as exc:
                    observer.stats.count("dropped")
                    log.warning("observer.failed", observer=observer.name, error=repr(exc))
            for impl in self.plugins.manager.hook.ingestd_event.get_hookimpls():
                try:
                    impl.function(event=event)
                except Exception as exc:
                    self.hook_failures[impl.plugin_name] = self.hook_failures.get(impl.plugin_name, 0) + 1
                    log.warning("plugin.event_hook_failed", plugin=impl.plugin_name, error=repr(exc))
            for listener in list(self.listeners):
                try:
                    listener(event)
                except Exception as exc:
                    log.warning("listener_failed", error=repr(exc))


R = TypeVar("R", bound=Connector | Sink)


def _scrubbed(event: Event) -> Event:
    """The event as observers and logs may see it: no configured secret in its texts."""
    if not SECRETS:
        return event
    return dataclasses.replace(event, data=scrub_value(event.data),
                               source=scrub_value(event.source) if event.source else event.source)


class _Shared(Generic[R]):
    """A connector or sink instance with the jobs that use it. Retired by a reload that removes or
    changes its table, it is closed when the last job using it ends."""

    def __init__(self, resource: R):
        self.resource = resource
        self.users = 0
        self.retired = False


class Runtime:
    def __init__(self, config: Config, plugins: LoadedPlugins, *, outbox: bool | None = None, daemon: bool = False):
        self.config = config
        self.plugins = plugins
        self.dispatch = Dispatcher(plugins)
        self.replica = config.replica_id() if daemon else f"{config.replica_id()}.cli-{os.getpid()}"
        """This process's id among replicas (`[daemon] replica_id` for the daemon). A CLI command
        beside a running daemon is a replica of its own: with the daemon's id, its claims would
        take over (and fence out) the daemon's own leases."""
        self.state = store_for(config, outbox=config.bus.enabled if outbox is None else outbox,
                               on_events=self.dispatch, replica=self.replica)
        self.shared = self.state.shared
        """The state store is shared by replicas (PostgreSQL): loads, windows and backfill days are
        claimed first (engine/lease.py)."""
        self.lease_seconds = config.daemon.lease_seconds
        self.window_slots = asyncio.Semaphore(config.daemon.max_concurrent_loads)
        """Windows this replica runs at once when shared (engine/lease.py `window_claim`)."""
        self._connectors: dict[str, _Shared[Connector]] = {}
        self._sinks: dict[str, _Shared[Sink]] = {}
        self._retired: list[_Shared[Connector] | _Shared[Sink]] = []
        self.observers: dict[str, Observer] = {}
        self.sink_errors: dict[str, str] = {}
        """Sinks that could not be opened yet (`open(sinks_required=False)`), with the error."""
        self.slots = asyncio.Semaphore(config.daemon.max_concurrent_loads)
        self._partition_locks: dict[tuple[str, dt.date], asyncio.Lock] = defaultdict(asyncio.Lock)
        self.activity: dict[str, str] = {}
        self.stopping = asyncio.Event()

    async def open(self, *, sinks_required: bool = True) -> Runtime:
        """Open the state store, the observers and the sinks. With `sinks_required` False (the
        daemon), a sink that cannot be opened is recorded in `sink_errors` instead of failing:
        `open_sinks` tries again, and the daemon reports itself not ready meanwhile."""
        check_capabilities(self.config, self.plugins)
        logs.set_secrets(self.config.secrets())
        await self.state.open()
        try:
            await self._open_observers()
            if sinks_required:
                self._sinks = {name: _Shared(s) for name, s in (await open_sinks(self.config, self.plugins)).items()}
            else:
                await self.open_sinks()
        except BaseException:
            await self.close()
            raise
        return self

    async def open_sinks(self) -> bool:
        """Try to open every configured sink not open yet; True when all are open."""
        self.sink_errors = {}
        for name in self.config.sinks:
            if name in self._sinks:
                continue
            try:
                opened = await open_sinks(self.config, self.plugins, only={name})
            except ConfigError as exc:
                self.sink_errors[name] = exc.message
                continue
            self._sinks.update((n, _Shared(sink)) for n, sink in opened.items())
        return not self.sink_errors

    def sink_error(self, name: str) -> str | None:
        """None when sink `name` is open, else why not."""
        return None if name in self._sinks else self.sink_errors.get(name, "not opened yet")

    @property
    def sinks_ready(self) -> bool:
        return all(name in self._sinks for name in self.config.sinks)

    async def _open_observers(self) -> None:
        for name, plugged in self.config.observers.items():
            observer = self.plugins.registry.observers[plugged.type](plugged.config, name=name)
            try:
                await observer.open()
            except Exception as exc:
                raise ConfigError(f"observers.{name}", f"could not be opened: {exc}", file=str(self.config.file)) \
                    from exc
            self.observers[name] = observer
            self.dispatch.observers.append(observer)

    async def close(self) -> None:
        self.dispatch.observers.clear()
        for observer in self.observers.values():
            try:
                await observer.close()
            except Exception as exc:
                log.warning("observer.close_failed", observer=observer.name, error=repr(exc))
        self.observers.clear()
        for shared in [*self._connectors.values(), *self._sinks.values(), *self._retired]:
            with contextlib.suppress(Exception):
                await shared.resource.close()
        self._connectors.clear()
        self._sinks.clear()
        self._retired.clear()
        await self.state.close()

    # -- what loads use ---------------------------------------------------------------------------

    def connector(self, name: str) -> Connector:
        """The connector of connection `name`, made on first use."""
        if name not in self._connectors:
            plugged = self.config.connections[name]
            self._connectors[name] = _Shared(self.plugins.registry.connectors[plugged.type](plugged.config, name=name))
        return self._connectors[name].resource

    def sink(self, name: str) -> Sink:
        if name not in self._sinks:
            raise SinkUnavailable(f"sink {name!r} is not open: {self.sink_errors.get(name, 'not opened yet')}")
        return self._sinks[name].resource

    def sink_of(self, source: str) -> Sink:
        return self.sink(self.config.sink_of(source))

    @contextlib.asynccontextmanager
    async def job(self, source: str) -> AsyncIterator[Job]:
        """A snapshot of `source` for one load: its config, connector and sink as they are now.
        Raises `SourceGone` if a reload removed the source."""
        config = self.config
        src = config.sources.get(source)
        if src is None:
            raise SourceGone(f"source {source!r} is no longer configured")
        self.sink(config.sink_of(source))  # SinkUnavailable while it cannot be opened
        self.connector(src.connection)
        connection, sink = self._connectors[src.connection], self._sinks[config.sink_of(source)]
        plugged = config.connections[src.connection]
        job = Job(source, src, src.connection, plugged.type, plugged.config, connection.resource,
                  config.sink_of(source), sink.resource, config.daemon, tuple(config.secrets()))
        connection.users += 1
        sink.users += 1
        try:
            yield job
        finally:
            connection.users -= 1
            sink.users -= 1
            await self._close_unused()

    def partition_lock(self, source: str, day: dt.date) -> asyncio.Lock:
        return self._partition_locks[(source, day)]

    # -- reloads -----------------------------------------------------------------------------------

    def reconfigure(self, new: Config, opened_sinks: dict[str, Sink]) -> None:
        """Take `new` as the config. `opened_sinks` are the sinks `new` adds or changes, opened
        already; the sinks and connectors it removes or changes are retired: loads running on them
        go on, and each is closed when its last load ends."""
        old = self.config
        self.config = new
        for name in [n for n in self._sinks if n not in new.sinks or n in opened_sinks]:
            self._retire(self._sinks.pop(name))
        for name, sink in opened_sinks.items():
            self._sinks[name] = _Shared(sink)
        for name in list(self._connectors):
            if name not in new.connections or new.connections[name] != old.connections.get(name):
                self._retire(self._connectors.pop(name))

    def _retire(self, shared: _Shared[Connector] | _Shared[Sink]) -> None:
        shared.retired = True
        self._retired.append(shared)

    async def _close_unused(self) -> None:
        for shared in [s for s in self._retired if s.users == 0]:
            self._retired.remove(shared)
            try:
                await shared.resource.close()
            except Exception as exc:
                log.warning("close_failed", name=getattr(shared.resource, "name", "?"), error=repr(exc))

    async def settle_retired(self) -> None:
        """Close the retired connectors and sinks no load uses any more (after a reload)."""
        await self._close_unused()


async def open_sinks(config: Config, plugins: LoadedPlugins, *, only: set[str] | None = None) -> dict[str, Sink]:
    """Open the config's sinks (or those named in `only`): all of them, or none. A sink that fails
    to open is a config error naming its table; the ones opened before it are closed again."""
    opened: dict[str, Sink] = {}
    try:
        for name, plugged in config.sinks.items():
            if only is not None and name not in only:
                continue
            sink = plugins.registry.sinks[plugged.type](plugged.config, name=name)
            try:
                await sink.open()
            except Exception as exc:
                raise ConfigError(f"sinks.{name}", f"could not be opened: {exc}", file=str(config.file)) from exc
            opened[name] = sink
    except BaseException:
        for sink in opened.values():
            with contextlib.suppress(Exception):
                await sink.close()
        raise
    return opened


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
