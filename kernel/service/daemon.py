"""The long-running daemon: lifecycle, window loop, signals, systemd notify and watchdog.

Start: config and plugins, state store (locked), sinks, settle interrupted runs, resume stored
backfills, catch up missed days, then sleep until the next window of any source.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import heapq
import signal
from collections.abc import Callable

from ..engine import backfill as backfills
from ..core import logs
from ..core.config import Config, load_config
from ..core.errors import ConfigError
from ..core.events import DaemonStarted, DaemonStopping
from ..engine.ingest import recover
from .notify import Notifier, watchdog_interval
from ..engine.planner import load_windows, recheck_windows, run_due, run_load_window, run_recheck_window
from ..plugin.manager import LoadedPlugins, load_plugins
from ..engine.runtime import Runtime, event

log = logs.get("ingestd.daemon")
MAX_SLEEP = 60.0


class Daemon:
    def __init__(self, config: Config, plugins: LoadedPlugins, *, notifier: Notifier | None = None):
        self.config = config
        self.plugins = plugins
        self.notifier = notifier or Notifier()
        self.rt: Runtime | None = None
        self.tasks: set[asyncio.Task] = set()
        self.running: set[tuple[str, str]] = set()
        self.wake = asyncio.Event()
        self.bus = None
        self.extra_services: list[Callable[["Daemon"], object]] = []

    def spawn(self, coro, name: str | None = None) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task.failed", task=task.get_name(), error=repr(task.exception()))

    async def start(self) -> Runtime:
        rt = await Runtime(self.config, self.plugins).open()
        self.rt = rt
        settled = await recover(rt)
        if settled:
            log.info("recovered", runs=len(settled))
        return rt

    async def serve(self) -> None:
        """Run until SIGTERM/SIGINT (or `stop()`); reload the config on SIGHUP."""
        rt = await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.spawn(self.reload(), "reload"))
        try:
            if self.config.bus.enabled:
                from ..bus.server import Bus
                self.bus = Bus(self)
                self.spawn(self.bus.run(), "bus")
            for b in await rt.state.backfills("running"):
                self.spawn(self._run_backfill(b.id), f"backfill-{b.id}")
            for name in self.config.sources:
                if self.config.sources[name].enabled:
                    self._start_window(name, "due", lambda n=name: run_due(rt, n, dt.datetime.now(dt.UTC)))
            await rt.state.emit([event(DaemonStarted, None, None, None, sources=sorted(self.config.sources))])
            self.notifier.ready(self.status_line())
            self.spawn(self._heartbeat(), "heartbeat")
            await self._window_loop()
        finally:
            await self.shutdown()

    def stop(self) -> None:
        if self.rt and not self.rt.stopping.is_set():
            log.info("daemon.stop_requested")
            self.notifier.stopping()
            self.rt.stopping.set()
            self.wake.set()

    async def shutdown(self) -> None:
        rt = self.rt
        assert rt is not None
        rt.stopping.set()
        grace = self.config.daemon.shutdown_grace_seconds
        work = [t for t in self.tasks if t.get_name() not in ("bus", "heartbeat")]
        if work:
            done, pending = await asyncio.wait(work, timeout=grace)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        with contextlib.suppress(Exception):
            await rt.state.emit([event(DaemonStopping, None, None, None, reason="signal")])
        if self.bus is not None:
            await self.bus.close()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await rt.close()
        self.notifier.close()
        log.info("daemon.stopped")

    def _start_window(self, source: str, kind: str, make) -> None:
        key = (source, "window")
        if key in self.running:
            log.info("window.skipped", source=source, kind=kind, reason="previous window still running")
            return
        self.running.add(key)

        async def go():
            try:
                await make()
            finally:
                self.running.discard(key)

        self.spawn(go(), f"{kind}-{source}")

    async def _window_loop(self) -> None:
        rt = self.rt
        assert rt is not None
        heap: list[tuple[dt.datetime, str, str]] = []
        self._heap = heap

        def schedule(now: dt.datetime) -> None:
            heap.clear()
            for name, src in self.config.sources.items():
                if not src.enabled:
                    continue
                heap.append((load_windows(self.config, name).next_after(now), name, "load"))
                if (rw := recheck_windows(self.config, name)) is not None:
                    heap.append((rw.next_after(now), name, "recheck"))
            heapq.heapify(heap)

        schedule(dt.datetime.now(dt.UTC))
        self._reschedule = schedule
        while not rt.stopping.is_set():
            now = dt.datetime.now(dt.UTC)
            while heap and heap[0][0] <= now:
                at, name, kind = heapq.heappop(heap)
                if name in self.config.sources:
                    fn = run_load_window if kind == "load" else run_recheck_window
                    self._start_window(name, kind, lambda n=name, f=fn, a=at: f(rt, n, a))
                    windows = load_windows(self.config, name) if kind == "load" else recheck_windows(self.config, name)
                    if windows is not None:
                        heapq.heappush(heap, (windows.next_after(now), name, kind))
            timeout = MAX_SLEEP if not heap else max(0.0, min(MAX_SLEEP, (heap[0][0] - now).total_seconds()))
            self.wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout)

    async def _run_backfill(self, backfill_id: int) -> str:
        assert self.rt is not None
        return await backfills.run(self.rt, backfill_id)

    def status_line(self) -> str:
        rt = self.rt
        if rt is None:
            return "starting"
        busy = sorted(rt.activity.values())
        return ", ".join(busy) if busy else f"idle, {len(self.config.sources)} sources"

    async def _heartbeat(self) -> None:
        """Pings the watchdog from the event loop itself, so a blocked loop stops the pings."""
        interval = watchdog_interval()
        tick = min(interval, 5.0) if interval else 5.0
        last_status = ""
        while True:
            if interval:
                self.notifier.watchdog()
            line = self.status_line()
            if line != last_status:
                self.notifier.status(line)
                last_status = line
            await asyncio.sleep(tick)

    async def reload(self) -> None:
        """SIGHUP: read the config again; refuse an invalid one and keep the running config."""
        rt = self.rt
        assert rt is not None
        self.notifier.reloading()
        try:
            new = load_config(self.config.file, self.plugins.registry, self.plugins.errors())
            from ..engine.runtime import check_capabilities
            check_capabilities(new, self.plugins)
            new_sinks = await self._open_changed_sinks(new)
        except Exception as exc:
            log.error("config.reload_refused", error=str(exc))
            self.notifier.ready(self.status_line())
            return
        restart_needed = [f"daemon.{k}" for k in ("state_path", "log_level", "max_concurrent_loads")
                          if getattr(new.daemon, k) != getattr(self.config.daemon, k)]
        restart_needed += ["bus"] if new.bus != self.config.bus else []
        if restart_needed:
            log.warning("config.restart_needed", keys=restart_needed)
        added = sorted(set(new.sources) - set(self.config.sources))
        removed = sorted(set(self.config.sources) - set(new.sources))
        changed = sorted(n for n in set(new.sources) & set(self.config.sources)
                         if new.sources[n] != self.config.sources[n])
        old_connections = self.config.connections
        self.config = new
        rt.config = new
        for name in set(rt.sinks) - set(new.sinks):
            rt.retire_sink(name)
        for name, sink in new_sinks.items():
            rt.retire_sink(name)
            rt.sinks[name] = sink
        for name, plugged in list(rt.connectors.items()):
            if name not in new.connections or new.connections[name] != old_connections.get(name):
                conn = rt.connectors.pop(name)
                self.spawn(conn.close(), f"close-{name}")
        if getattr(self, "_reschedule", None):
            self._reschedule(dt.datetime.now(dt.UTC))
        for name in added + changed:
            if new.sources[name].enabled:
                self._start_window(name, "due", lambda n=name: run_due(rt, n, dt.datetime.now(dt.UTC)))
        self.wake.set()
        log.info("config.reloaded", added=added, removed=removed, changed=changed, sinks=sorted(new_sinks))
        self.notifier.ready(self.status_line())

    async def _open_changed_sinks(self, new) -> dict:
        """Open the sinks that a reload adds or changes; all of them, or none (a sink that fails
        to open refuses the reload, and the ones opened before it are closed again)."""
        opened: dict = {}
        try:
            for name, plugged in new.sinks.items():
                if self.config.sinks.get(name) == plugged:
                    continue
                sink = self.plugins.registry.sinks[plugged.type](plugged.config, name=name)
                try:
                    await sink.open()
                except Exception as exc:
                    raise ConfigError(f"sinks.{name}", f"could not be opened: {exc}",
                                      file=str(self.config.file)) from exc
                opened[name] = sink
        except BaseException:
            for sink in opened.values():
                with contextlib.suppress(Exception):
                    await sink.close()
            raise
        return opened


def run_forever(config_path: str) -> int:
    plugins = load_plugins()
    config = load_config(config_path, plugins.registry, plugins.errors())
    logs.configure(config.daemon.log_level)
    for info in plugins.infos:
        if info.error:
            log.warning("plugin.failed", plugin=info.name, error=info.error)
    daemon = Daemon(config, plugins)
    asyncio.run(daemon.serve())
    return 0
