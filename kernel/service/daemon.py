"""The long-running daemon: the window loop, signals, reloads, systemd notify and watchdog.

A `Daemon` is whole once constructed: it receives an opened runtime (state store locked, sinks
open, interrupted runs settled), the control layer and its services (the MQTT bus, and next the
HTTP listener), built by `service.bootstrap`. `serve` resumes stored backfills, catches up
missed days, then sleeps until the next window of any source.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import heapq
import importlib.metadata
import signal
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol

from ..core import logs
from ..core.config import Config, load_config
from ..core.events import DaemonStarted, DaemonStopping
from ..engine.planner import load_windows, recheck_windows, run_due, run_load_window, run_recheck_window
from ..engine.runtime import Runtime, check_capabilities, event, open_sinks
from .control import Control
from .notify import Notifier, watchdog_interval
from .tasks import Tasks

log = logs.get("ingestd.daemon")

try:
    VERSION = importlib.metadata.version("ingestd")
except importlib.metadata.PackageNotFoundError:  # run from a checkout without installing
    VERSION = "unknown"
MAX_SLEEP = 60.0
SERVICE = "service:"
"""Task name prefix of services: shutdown lets work finish first, then stops them."""


class Service(Protocol):
    """Something the daemon runs beside its windows (the bus; the HTTP listener)."""

    name: str

    async def run(self) -> None:
        """Serve until cancelled or closed; survive outages of what it talks to."""

    async def close(self) -> None:
        """Flush and stop, at shutdown, after the last load ended."""

    # Optional: `async start()`, awaited before any service runs (the HTTP listener binds its port
    # there, so a port in use stops the daemon), and `health() -> tuple[bool, str]`, the service's
    # readiness for `/readyz`.


class Daemon:
    def __init__(self, rt: Runtime, control: Control, tasks: Tasks, *, services: Sequence[Service] = (),
                 notifier: Notifier | None = None, settle: Callable[[Runtime], Awaitable[None]] | None = None):
        self.rt = rt
        self._settle = settle
        self.stop_requests = 0
        self.abort = asyncio.Event()
        """Set by a third stop request: shutdown stops waiting for running loads."""
        self.control = control
        self.tasks = tasks
        self.services = list(services)
        self.notifier = notifier or Notifier()
        self._windows_running: set[str] = set()
        self._heap: list[tuple[dt.datetime, str, str]] = []
        self.wake = asyncio.Event()

    @property
    def config(self) -> Config:
        return self.rt.config

    async def serve(self) -> None:
        """Run until SIGTERM/SIGINT (or `stop()`); reload the config on SIGHUP."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.tasks.spawn(self.reload(), "reload"))
        try:
            for service in self.services:
                start = getattr(service, "start", None)
                if callable(start):  # optional: bind what must be bound before work begins (a port)
                    await start()
            for service in self.services:
                self.tasks.spawn(service.run(), SERVICE + service.name)
            if not await self._wait_for_sinks():
                return
            await self.control.resume_backfills()
            for name, src in self.config.sources.items():
                if src.enabled:
                    self._start_window(name, "due", functools.partial(self._run_due, name))
            await self.rt.state.emit([event(DaemonStarted, None, None, None, version=VERSION,
                                            sources=sorted(self.config.sources))])
            self.notifier.ready(self.status_line())
            self.tasks.spawn(self._heartbeat(), SERVICE + "heartbeat")
            if self.rt.shared:
                self.tasks.spawn(self._cluster(), SERVICE + "cluster")
            await self._window_loop()
        finally:
            await self.shutdown()

    async def _wait_for_sinks(self) -> bool:
        """Open the sinks that could not be opened at start, trying again with backoff (the
        services, the HTTP listener's `/readyz` among them, run meanwhile); then settle the runs
        a killed process left. False if the daemon was stopped first."""
        attempt = 0
        while not self.rt.sinks_ready:
            if await self.rt.open_sinks():
                break
            attempt += 1
            delay = min(60.0, 1.0 * 2 ** min(attempt - 1, 6))
            for name, error in self.rt.sink_errors.items():
                log.error("sink.open_failed", sink=name, error=error, attempt=attempt, retry_in_s=delay)
            self.notifier.status(f"waiting for sinks: {', '.join(sorted(self.rt.sink_errors))}")
            self.wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), delay)
            if self.rt.stopping.is_set():
                return False
        if attempt:
            log.info("sink.opened", sinks=sorted(self.config.sinks), attempts=attempt + 1)
        if self._settle is not None and attempt:
            await self._settle(self.rt)
        return True

    def stop(self) -> None:
        """SIGTERM/SIGINT. The first starts a graceful stop; a second says what it waits for; a
        third stops waiting (running loads are rolled back: their previous generation stays)."""
        self.stop_requests += 1
        if self.stop_requests == 1:
            log.info("daemon.stop_requested")
            self.notifier.stopping()
            self.rt.stopping.set()
            self.wake.set()
        elif self.stop_requests == 2:
            waiting = self.control.waiting_for()
            log.warning("daemon.still_stopping", waiting_for=waiting or ["services to close"],
                        grace_s=self.config.daemon.shutdown_grace_seconds,
                        hint="send it again to stop now: running loads are rolled back")
        else:
            log.warning("daemon.stop_now", abandoning=self.control.waiting_for())
            self.abort.set()

    async def shutdown(self) -> None:
        self.rt.stopping.set()
        await self.tasks.settle(self.config.daemon.shutdown_grace_seconds, keep=(SERVICE,), abort=self.abort)
        with contextlib.suppress(Exception):
            await self.rt.state.emit([event(DaemonStopping, None, None, None, reason="signal")])
        for service in self.services:
            with contextlib.suppress(Exception):
                await service.close()
        await self.tasks.cancel_all()
        await self.rt.close()
        self.notifier.close()
        log.info("daemon.stopped")

    async def _run_due(self, source: str) -> dict[str, dict[dt.date, str]]:
        """Everything due for a source, as of when its window task starts."""
        return await run_due(self.rt, source, dt.datetime.now(dt.UTC))

    def _start_window(self, source: str, kind: str, make: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        if source in self._windows_running:
            log.info("window.skipped", source=source, kind=kind, reason="previous window still running")
            return
        self._windows_running.add(source)

        async def go() -> None:
            try:
                await make()
            finally:
                self._windows_running.discard(source)

        self.tasks.spawn(go(), f"{kind}-{source}")

    def _schedule(self, now: dt.datetime) -> None:
        """The next load and re-check window of every enabled source, from the current config."""
        heap = []
        for name, src in self.config.sources.items():
            if not src.enabled:
                continue
            heap.append((load_windows(self.config, name).next_after(now), name, "load"))
            if (rw := recheck_windows(self.config, name)) is not None:
                heap.append((rw.next_after(now), name, "recheck"))
        heapq.heapify(heap)
        self._heap = heap

    async def _window_loop(self) -> None:
        rt = self.rt
        self._schedule(dt.datetime.now(dt.UTC))
        while not rt.stopping.is_set():
            heap = self._heap
            now = dt.datetime.now(dt.UTC)
            while heap and heap[0][0] <= now:
                at, name, kind = heapq.heappop(heap)
                if name not in self.config.sources:
                    continue
                fn = run_load_window if kind == "load" else run_recheck_window
                self._start_window(name, kind, functools.partial(fn, rt, name, at))
                windows = load_windows(self.config, name) if kind == "load" else recheck_windows(self.config, name)
                if windows is not None:
                    heapq.heappush(heap, (windows.next_after(now), name, kind))
            timeout = MAX_SLEEP if not heap else max(0.0, min(MAX_SLEEP, (heap[0][0] - now).total_seconds()))
            self.wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout)

    def status_line(self) -> str:
        busy = sorted(self.rt.activity.values())
        return ", ".join(busy) if busy else f"idle, {len(self.config.sources)} sources"

    async def _cluster(self) -> None:
        """Replicas (a shared state store): say this replica is alive every third of a lease,
        and once a lease take over what dead or stalled replicas left: their interrupted runs
        (settled), their unsent events (the outbox), windows whose claim lapsed, and the days of
        running backfills."""
        rt = self.rt
        swept = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                await rt.state.heartbeat()
                if loop.time() - swept >= rt.lease_seconds:
                    swept = loop.time()
                    await self._sweep()
            except Exception as exc:  # the state store is unreachable for now: try again next tick
                log.warning("cluster.sweep_failed", error=str(exc), replica=rt.replica)
            await asyncio.sleep(rt.lease_seconds / 3)

    async def _sweep(self) -> None:
        rt = self.rt
        if self._settle is not None:
            await self._settle(rt)
        adopted = await rt.state.adopt_outbox(2 * rt.lease_seconds)  # a replica missing two leases' heartbeats
        if adopted:
            log.info("outbox.adopted", events=adopted, replica=rt.replica)
        await self.control.resume_backfills()
        for name, src in self.config.sources.items():
            if src.enabled and name not in self._windows_running and not rt.stopping.is_set():
                self._start_window(name, "due", functools.partial(self._run_due, name))

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
        """SIGHUP: read the config again; refuse an invalid one and keep the running config.
        Loads running go on with the job they started with (`engine.job`)."""
        self.notifier.reloading()
        old = self.config
        try:
            new = load_config(old.file, self.rt.plugins.registry, self.rt.plugins.errors())
            check_capabilities(new, self.rt.plugins)
            changed_sinks = {n for n, plugged in new.sinks.items() if old.sinks.get(n) != plugged}
            opened = await open_sinks(new, self.rt.plugins, only=changed_sinks)
        except Exception as exc:
            log.error("config.reload_refused", error=str(exc))
            self.notifier.ready(self.status_line())
            return
        restart_keys = ("state_path", "state_url", "state_password", "state_schema", "replica_id", "lease_seconds",
                        "log_level", "max_concurrent_loads")
        restart_needed = [f"daemon.{k}" for k in restart_keys
                          if getattr(new.daemon, k) != getattr(old.daemon, k)]
        restart_needed += ["bus"] if new.bus != old.bus else []
        restart_needed += ["http"] if new.http != old.http else []
        restart_needed += ["observers"] if new.observers != old.observers else []
        if restart_needed:
            log.warning("config.restart_needed", keys=restart_needed)
        added = sorted(set(new.sources) - set(old.sources))
        removed = sorted(set(old.sources) - set(new.sources))
        changed = sorted(n for n in set(new.sources) & set(old.sources) if new.sources[n] != old.sources[n])
        self.rt.reconfigure(new, opened)
        await self.rt.settle_retired()
        self._schedule(dt.datetime.now(dt.UTC))
        for name in added + changed:
            if new.sources[name].enabled:
                self._start_window(name, "due", functools.partial(self._run_due, name))
        self.wake.set()
        log.info("config.reloaded", added=added, removed=removed, changed=changed, sinks=sorted(opened))
        self.notifier.ready(self.status_line())
