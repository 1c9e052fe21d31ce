"""Partition leases across replicas: a load holds `(source, day)` while it works.

With a shared state store (`[daemon] state_url`), a load first claims the partition's lease,
which gives it a fencing token; a task renews the lease while the load runs; the commit of the
generation is fenced by that token (the state store checks it in the commit's transaction, and a
PostgreSQL sink in its swap transaction), so a replica that stalled past its lease and woke up
cannot publish. With the embedded SQLite store one process holds the whole store (a file lock),
and a lease is always granted without a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ..core import logs
from ..core.contracts import Fence
from .runtime import Runtime

log = logs.get("ingestd.lease")


@dataclass
class Lease:
    """A held partition lease; `token` is None when the store is not shared (no fencing)."""

    token: int | None
    fence: Fence | None = None
    lost: bool = False
    run_id: str | None = None
    """The run the load under this lease recorded, once it has one."""

    def floor(self) -> int:
        """The lowest generation this load may write: the fencing token."""
        return self.token or 0


@contextlib.asynccontextmanager
async def partition_lease(rt: Runtime, source: str, day: dt.date) -> AsyncIterator[Lease | None]:
    """Hold the lease of `(source, day)` for the block; None when another replica holds it."""
    if not rt.shared:
        yield Lease(None)
        return
    token = await rt.state.claim_partition(source, day, rt.lease_seconds)
    if token is None:
        log.info("lease.busy", source=source, day=day.isoformat(), replica=rt.replica)
        yield None
        return
    lease = Lease(token, rt.state.fence(source, day, token))

    def lost() -> None:
        lease.lost = True

    try:
        async with renewing(rt, "lease", lambda: rt.state.renew_partition(source, day, token, rt.lease_seconds),
                            lost, source=source, day=day.isoformat(), token=token):
            yield lease
    finally:
        with contextlib.suppress(Exception):  # an expired lease lapses by itself
            await asyncio.shield(rt.state.release_partition(source, day, token))


@contextlib.asynccontextmanager
async def renewing(rt: Runtime, what: str, renew: Callable[[], Awaitable[bool]],
                   on_lost: Callable[[], None] | None = None, **ctx: Any) -> AsyncIterator[None]:
    """Renew a lease or claim (`renew`) every third of `lease_seconds` while the block runs.
    A renewal that fails (the store unreachable for now) is tried again at the next tick; one
    that answers False means it lapsed: `<what>.lost` is logged, `on_lost` called, and renewing
    stops. What it guarded is decided by its fence or claim, never by this task."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(rt.lease_seconds / 3)
            try:
                held = await renew()
            except Exception as exc:
                log.warning(f"{what}.renew_failed", error=str(exc), replica=rt.replica, **ctx)
                continue
            if not held:
                log.warning(f"{what}.lost", replica=rt.replica, **ctx)
                if on_lost is not None:
                    on_lost()
                return

    task = asyncio.create_task(loop(), name=f"renew-{what}")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


@contextlib.asynccontextmanager
async def window_claim(rt: Runtime, source: str, kind: str, due: dt.datetime) -> AsyncIterator[bool]:
    """Claim the `kind` window of `source` due at `due` for the block: True for one replica of
    the cluster (the claim is renewed while the window runs, and lapses if this replica dies, so
    another takes the window over); always True with the embedded store.

    A replica runs at most `max_concurrent_loads` claimed windows at once (`rt.window_slots`):
    the windows a replica cannot start yet stay free for the others to claim, rather than one
    replica taking every window due and leaving its peers idle."""
    if not rt.shared:
        log.info("window.claimed", source=source, kind=kind, due=due.isoformat(), replica=rt.replica)
        yield True
        return
    async with rt.window_slots:
        if rt.stopping.is_set() or not await rt.state.claim_window(source, kind, due, rt.lease_seconds):
            yield False
            return
        log.info("window.claimed", source=source, kind=kind, due=due.isoformat(), replica=rt.replica)
        # A lapsed window claim only lets another replica run the window again: its days stay leased.
        async with renewing(rt, "window", lambda: rt.state.renew_window(source, kind, due, rt.lease_seconds),
                            source=source, kind=kind):
            yield True
