"""Putting a process together: the runtime opened and settled, the control layer over it, and,
for `ingestd run`, the daemon with the services it is given.

The services (the MQTT bus, the HTTP listener) live in layers above this one; the caller (the
CLI) passes their factories, so the daemon receives them instead of building them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence

from ..core import logs
from ..core.config import Config
from ..engine.ingest import recover
from ..engine.runtime import Runtime
from ..plugin.manager import LoadedPlugins
from .control import Control
from .daemon import Daemon, Service
from .notify import Notifier
from .tasks import Tasks

log = logs.get("ingestd")

ServiceFactory = Callable[[Runtime, Control], "Service | None"]
"""Makes a service for a daemon, or None when the config leaves it off."""


async def open_runtime(config: Config, plugins: LoadedPlugins, *, sinks_required: bool = True,
                       daemon: bool = False) -> Runtime:
    """The runtime opened (state store locked, sinks open) with interrupted runs settled. With
    `sinks_required` False (the daemon), sinks that cannot be opened yet are left to
    `Daemon.serve`, which settles interrupted runs once they are open."""
    rt = await Runtime(config, plugins, daemon=daemon).open(sinks_required=sinks_required)
    try:
        if rt.sinks_ready:
            await settle(rt)
    except BaseException:
        await rt.close()
        raise
    return rt


async def settle(rt: Runtime) -> None:
    """Settle the runs a killed process left running, from what the sinks hold."""
    settled = await recover(rt)
    if settled:
        log.info("recovered", runs=len(settled))


@contextlib.asynccontextmanager
async def local_control(config: Config, plugins: LoadedPlugins) -> AsyncIterator[Control]:
    """The control layer in this process, for a CLI command that works without a daemon; holds
    the state store's lock until the block ends."""
    rt = await open_runtime(config, plugins)
    tasks = Tasks()
    try:
        yield Control(rt, tasks)
        await tasks.settle(config.daemon.shutdown_grace_seconds)
    finally:
        await tasks.cancel_all()
        await rt.close()


async def make_daemon(config: Config, plugins: LoadedPlugins, services: Sequence[ServiceFactory] = (),
                      notifier: Notifier | None = None) -> Daemon:
    rt = await open_runtime(config, plugins, sinks_required=False, daemon=True)
    try:
        tasks = Tasks()
        control = Control(rt, tasks, activity=lambda: ", ".join(sorted(rt.activity.values())) or "idle")
        made = [s for s in (factory(rt, control) for factory in services) if s is not None]
        for service in made:
            check = getattr(service, "health", None)
            if callable(check):
                control.checks[service.name] = check
        return Daemon(rt, control, tasks, services=made, notifier=notifier, settle=settle)
    except BaseException:
        await rt.close()
        raise


def run_forever(config: Config, plugins: LoadedPlugins, services: Sequence[ServiceFactory] = ()) -> int:
    """`ingestd run`: serve until SIGTERM/SIGINT."""
    async def serve() -> None:
        daemon = await make_daemon(config, plugins, services)
        await daemon.serve()

    asyncio.run(serve())
    return 0
